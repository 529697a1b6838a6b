-- wrk script of the balance runs (bench.py --balance): counts the responses
-- of each worker by their X-Worker-Pid header and prints one line
-- "worker PID COUNT" per worker at the end. Every wrk thread counts in its
-- own Lua state; done() sums the threads' tables.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
end

function response(status, headers, body)
  local pid = headers["X-Worker-Pid"] or "none"
  counts[pid] = (counts[pid] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for pid, n in pairs(thread:get("counts")) do
      total[pid] = (total[pid] or 0) + n
    end
  end
  for pid, n in pairs(total) do
    io.write(string.format("worker %s %d\n", pid, n))
  end
end

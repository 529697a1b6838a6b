// The Node.js baseline of tests/bench/run.sh: `cluster` in round-robin mode,
// where the primary accepts every connection and hands it to a worker over
// IPC (the same job as fdbroker's, done by Node). The workers answer like
// fdbroker-http-worker: 200, X-Worker-Pid, a short text body, keep-alive.
//
//   node node_cluster.js HOST PORT WORKERS READY_FILE
//
// READY_FILE gets "pid=<primary>\nworkers=<pid,pid,...>\n" once every worker
// listens. SIGTERM stops the primary and its workers.
'use strict';
const cluster = require('cluster');
const fs = require('fs');
const http = require('http');

// Must be set before the first fork (NODE_CLUSTER_SCHED_POLICY=rr is the
// same); on Linux it is already the default, set for clarity.
cluster.schedulingPolicy = cluster.SCHED_RR;

const [host, portText, workersText, readyFile] = process.argv.slice(2);
const port = Number(portText);
const workers = Number(workersText);

if (cluster.isPrimary) {
  if (!host || !Number.isInteger(port) || !(workers > 0) || !readyFile) {
    console.error('usage: node node_cluster.js HOST PORT WORKERS READY_FILE');
    process.exit(2);
  }
  const listening = new Set();
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('listening', (worker) => {
    listening.add(worker.process.pid);
    if (listening.size !== workers) return;
    const tmp = `${readyFile}.tmp`;
    fs.writeFileSync(tmp, `pid=${process.pid}\nworkers=${[...listening].join(',')}\n`);
    fs.renameSync(tmp, readyFile);
  });
  // A worker that dies ends the baseline: a silently smaller pool would
  // flatter nobody and confuse everyone.
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    console.error(`worker ${worker.process.pid} exited (${code ?? signal})`);
    process.exit(1);
  });
  let stopping = false;
  process.on('SIGTERM', () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    process.exit(0);
  });
} else {
  const body = `hello from node cluster worker pid ${process.pid}\n`;
  const server = http.createServer((req, res) => {
    res.writeHead(200, {
      'X-Worker-Pid': String(process.pid),
      'Content-Type': 'text/plain',
      'Content-Length': Buffer.byteLength(body),
    });
    res.end(body);
  });
  // wrk keeps its connections busy, but an idle pause between runs must not
  // close them under it (Node's default is 5 s).
  server.keepAliveTimeout = 120000;
  server.listen(port, host);
  process.on('SIGTERM', () => process.exit(0));
}

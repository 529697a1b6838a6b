"""The conformance kit fails broken workers, naming the rule they break.

Each DEFECT of broken_worker.py is run through the kit's case for it: the
kit must exit 1 with a FAIL line for that case carrying the rule. The same
worker without a defect passes the same cases, so each failure is the
defect's doing. Needs FDBROKER_BIN_DIR (the kit) and PYTHONPATH with the
generated handoff_pb2.
"""
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
KIT = os.path.join(os.environ["FDBROKER_BIN_DIR"], "fdbroker-conformance")

# defect -> (case, the rule the failure must name)
EXPECTED = {
    "no-ack": ("ack", "§7.2 Hand-off"),
    "wrong-ack-id": ("ack", "§5 Ack: Ack for connection"),
    "no-closed": ("closed", "§7.3 Closed"),
    "double-closed": ("closed", "§7.3 Closed: Closed for connection"),
    "ignore-drain": ("drain-empty", "§7.7 Drain"),
    "bad-version": ("hello", "§5 ProtocolVersion"),
    "no-heartbeat": ("heartbeat-send", "§7.6 Heartbeats"),
    "no-sequence-check": ("error-sequence-gap", "§4 Sequence numbers"),
    "touch-rejected": ("drain-new-connection", "§5 Reject"),
    "stray-release": ("ack", "§5 Release: Release from a worker"),
    "slow-closed": ("closed", "§7.3 Closed: Closed for connection"),
    "drain-no-grace": ("drain-first-request", "§7.7 Drain"),
    "drain-grace-all": ("drain-idle", "§7.7 Drain"),
    "ignore-release-request": ("error-release-request", "§5 ReleaseRequest"),
    "ignore-unexpected": ("error-second-welcome", "§6 Session state machine"),
    "cut-as-closed": ("drain-deadline-cut",
                      "§7.3 Closed: connection"),
    "liveness-only-when-silent": ("liveness-heartbeat", "§7.11 Liveness"),
    "no-fd-check": ("error-connection-not-a-socket",
                    "§3 File descriptors: acked a Connection whose fd is a "
                    "pipe"),
}


def run_kit(defect, case):
    return subprocess.run(
        [KIT, f"--worker_cmd={sys.executable} "
              f"{os.path.join(HERE, 'broken_worker.py')} {defect}",
         f"--cases=^({case})$", "--timeout=4s",
         "--capabilities=request_response"],
        capture_output=True, text=True, timeout=60)


class BrokenWorkersTest(unittest.TestCase):

    def test_the_kit_fails_each_defect_naming_its_rule(self):
        for defect, (case, rule) in EXPECTED.items():
            with self.subTest(defect=defect):
                result = run_kit(defect, case)
                self.assertEqual(result.returncode, 1, result.stdout)
                fail = [line for line in result.stdout.splitlines()
                        if line.startswith(f"FAIL  {case} ")]
                self.assertEqual(len(fail), 1, result.stdout)
                self.assertIn(rule, result.stdout, result.stdout)
                self.assertIn("1 failed", result.stdout)

    def test_the_same_worker_without_a_defect_passes_those_cases(self):
        cases = sorted({case for case, _ in EXPECTED.values()})
        result = run_kit("none", "|".join(cases))
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn(f"{len(cases)} cases: {len(cases)} passed",
                      result.stdout)


if __name__ == "__main__":
    unittest.main()

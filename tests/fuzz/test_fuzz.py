"""The fuzz suite at CI size: every operator family's seeded cases (``fuzz_cases.py``) run in worker processes
(``fuzz_runner.py``), each judged "clear error or agreement with the reference"; a crash, a hang, a wrong result,
an accepted bad input or an unclear error fails the family's test and prints the case to replay.

``VISIONMOE_FUZZ_CASES`` (cases per family, default 500) and ``VISIONMOE_FUZZ_SEED`` (default 0) change the run;
``make fuzz`` runs thousands of cases and writes their summary.
"""

import json
import os
import sys

import pytest
from fuzz_cases import FAMILIES
from fuzz_runner import FINISHED, STARTED, run_keys, summarise

CASES_PER_FAMILY = int(os.environ.get("VISIONMOE_FUZZ_CASES", "500"))
SEED = int(os.environ.get("VISIONMOE_FUZZ_SEED", "0"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gives_a_clear_error_or_the_reference_result(family):
    summary = summarise(run_keys([(family, SEED, index) for index in range(CASES_PER_FAMILY)]))
    failures = summary["failures"]
    report = "\n".join(
        f"{f['status']}: {f['detail']}\n  python tests/fuzz/fuzz_runner.py --replay '{json.dumps(f)}'"
        for f in failures[:10]
    )
    assert not failures, f"{len(failures)} of {summary['cases']} cases failed ({summary['statuses']}):\n{report}"
    assert summary["cases"] == CASES_PER_FAMILY


def test_a_crashing_case_is_reported_with_its_input(tmp_path):
    """The crash guard itself: a worker killed by a signal mid-case yields a "crash" outcome for that case, with
    the case's spec, and the run goes on with the next case in a new worker."""
    script = tmp_path / "crashing_worker.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "for family, seed, index in json.load(sys.stdin):\n"
        f"    print({STARTED!r}, json.dumps([family, seed, index]), flush=True)\n"
        "    if index == 1:\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    outcome = dict(family=family, index=index, status='agree', detail='')\n"
        f"    print({FINISHED!r}, json.dumps(outcome), flush=True)\n"
    )
    outcomes = run_keys([("sinkhorn", 0, index) for index in range(3)], worker_command=[sys.executable, str(script)])
    assert [(o["index"], o["status"]) for o in outcomes] == [(0, "agree"), (1, "crash"), (2, "agree")]
    assert "-11" in outcomes[1]["detail"] and outcomes[1]["family"] == "sinkhorn" and "T" in outcomes[1]

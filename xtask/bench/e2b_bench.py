"""`cargo xtask bench e2b`'s client: the official E2B Python SDK against Wrenn, beside Wrenn's
own REST API driven from this same process with httpx (the SDK's own HTTP library), so that both
sides pay the same interpreter and client costs.

Started by `xtask/src/bench_e2b.rs` with the venv of `crates/envd/tests/sdk/requirements.txt`
and the environment a user would set: E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY for the SDK,
WRENN_API_URL and WRENN_API_KEY for the REST API. Measures, in milliseconds:

- sdk_create_run: `Sandbox.create(template)` until its first `commands.run("true")` returned;
- api_create_run: `POST /v1/sandboxes` until `POST /v1/sandboxes/{id}/exec {"cmd":"true"}`
  returned;
- sdk_run / api_exec: the same command again and again on one running sandbox;
- api_exec_bash: Wrenn's exec of `/bin/bash -l -c true`, the command line the SDK sends for
  `commands.run("true")`, to tell the login shell's cost from the path's.

The two sides alternate (which one goes first alternates too), each after one warm-up that is not
counted; every sandbox is killed after its sample, outside the timed span. Prints one JSON object
of samples to stdout; progress goes to stderr.
"""

import argparse
import json
import os
import sys
import time

import httpx
from e2b import Sandbox

#: Creating a sandbox in the nested host VM can take long; no sample should hit this.
REQUEST_TIMEOUT = 300.0


def log(message: str) -> None:
    print(f"e2b_bench: {message}", file=sys.stderr, flush=True)


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def check_sdk_result(result) -> None:
    if result.exit_code != 0:
        raise RuntimeError(f"the SDK's `true` exited with {result.exit_code}: {result.stderr!r}")


def check_exec(response: httpx.Response) -> None:
    response.raise_for_status()
    body = response.json()
    if body.get("exit_code") != 0:
        raise RuntimeError(f"Wrenn's exec of `true` answered {body}")


def kill_sdk(sandbox: Sandbox) -> None:
    if not sandbox.kill(request_timeout=REQUEST_TIMEOUT):
        log(f"warning: the SDK found no sandbox {sandbox.sandbox_id} to kill")


class Bench:
    def __init__(self, template: str) -> None:
        self.template = template
        self.api = httpx.Client(
            base_url=os.environ["WRENN_API_URL"],
            headers={"Authorization": f"Bearer {os.environ['WRENN_API_KEY']}"},
            timeout=REQUEST_TIMEOUT,
        )

    # The SDK: retries off, so that a retried request never hides inside a sample.
    def sdk_create(self) -> Sandbox:
        return Sandbox.create(self.template, request_timeout=REQUEST_TIMEOUT, retries=0)

    def sdk_create_run(self) -> float:
        started = time.perf_counter()
        sandbox = self.sdk_create()
        try:
            result = sandbox.commands.run("true", timeout=REQUEST_TIMEOUT)
            took = ms_since(started)
            check_sdk_result(result)
        finally:
            kill_sdk(sandbox)
        return took

    # Wrenn's REST API.
    def api_create(self) -> str:
        response = self.api.post("/v1/sandboxes", json={"template": self.template})
        response.raise_for_status()
        return response.json()["id"]

    def api_exec(self, sandbox_id: str, bash: bool = False) -> httpx.Response:
        body = {"cmd": "/bin/bash", "args": ["-l", "-c", "true"]} if bash else {"cmd": "true"}
        return self.api.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body)

    def api_kill(self, sandbox_id: str) -> None:
        self.api.delete(f"/v1/sandboxes/{sandbox_id}").raise_for_status()

    def api_create_run(self) -> float:
        started = time.perf_counter()
        sandbox_id = self.api_create()
        try:
            response = self.api_exec(sandbox_id)
            took = ms_since(started)
            check_exec(response)
        finally:
            self.api_kill(sandbox_id)
        return took

    def create_runs(self, runs: int) -> dict:
        samples = {"sdk_create_run": [], "api_create_run": []}
        sides = [("sdk_create_run", self.sdk_create_run), ("api_create_run", self.api_create_run)]
        log("warm-up: one create and run through each side")
        for _, measure in sides:
            measure()
        for round_ in range(runs):
            order = sides if round_ % 2 == 0 else sides[::-1]
            for name, measure in order:
                samples[name].append(measure())
            log(
                f"create+run {round_ + 1}/{runs}: "
                f"sdk {samples['sdk_create_run'][-1]:.0f} ms, "
                f"api {samples['api_create_run'][-1]:.0f} ms"
            )
        return samples

    def exec_runs(self, runs: int) -> dict:
        samples = {"sdk_run": [], "api_exec": [], "api_exec_bash": []}
        sandbox = self.sdk_create()
        sandbox_id = None
        try:
            sandbox_id = self.api_create()
            log(f"run on a running sandbox, {runs} times each (sdk {sandbox.sandbox_id}, api {sandbox_id})")
            for round_ in range(runs + 1):
                started = time.perf_counter()
                result = sandbox.commands.run("true", timeout=REQUEST_TIMEOUT)
                sdk_took = ms_since(started)
                check_sdk_result(result)
                started = time.perf_counter()
                response = self.api_exec(sandbox_id)
                api_took = ms_since(started)
                check_exec(response)
                started = time.perf_counter()
                response = self.api_exec(sandbox_id, bash=True)
                bash_took = ms_since(started)
                check_exec(response)
                if round_ > 0:  # the first of each is the warm-up
                    samples["sdk_run"].append(sdk_took)
                    samples["api_exec"].append(api_took)
                    samples["api_exec_bash"].append(bash_took)
        finally:
            kill_sdk(sandbox)
            if sandbox_id is not None:
                self.api_kill(sandbox_id)
        return samples


def main() -> int:
    parser = argparse.ArgumentParser(
        description="The E2B Python SDK against Wrenn, beside Wrenn's own REST API."
    )
    parser.add_argument("--runs", type=int, default=20, help="create+run samples per side")
    parser.add_argument("--exec-runs", type=int, default=50, help="run samples per side")
    parser.add_argument("--template", default="base")
    parser.add_argument(
        "--api-only",
        action="store_true",
        help="measure Wrenn's REST API alone (while the server has no E2B surface)",
    )
    args = parser.parse_args()
    bench = Bench(args.template)
    if args.api_only:
        samples = {"api_create_run": [], "api_exec": []}
        bench.api_create_run()
        for _ in range(args.runs):
            samples["api_create_run"].append(bench.api_create_run())
        sandbox_id = bench.api_create()
        try:
            for round_ in range(args.exec_runs + 1):
                started = time.perf_counter()
                response = bench.api_exec(sandbox_id)
                took = ms_since(started)
                check_exec(response)
                if round_ > 0:
                    samples["api_exec"].append(took)
        finally:
            bench.api_kill(sandbox_id)
    else:
        samples = bench.create_runs(args.runs)
        samples.update(bench.exec_runs(args.exec_runs))
    json.dump(samples, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every command block of the README, run as written (or, for a cloud, parsed by the
tool that would run it), so the README cannot drift from what the commands do.

Each ```sh block must be claimed by exactly one walker below; a new block nobody walks
fails `test_every_command_block_is_walked`. What the walk changes, and why:
- ports: the machine may run other Ray heads and stacks (CI runs the suite beside
  nothing, developers beside everything), so the default ports are mapped to free ones
  through the same variables an operator would set (`PERSONA_*_PORT`,
  `RAY_API_SERVER_ADDRESS`, `RAY_DASHBOARD_ADDRESS`), and where the README writes a
  port (`localhost:8000`, `ray start --head`) the text is mapped likewise;
- processes: each block runs in a process session of its own, which is killed at the
  end, so a failed walk leaves nothing behind (`ray stop` would stop every Ray here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from persona.settings import PROJECT_ROOT
from tests.ray_heads import free_port

README = (PROJECT_ROOT / "README.md").read_text()
BLOCKS = [
    block
    for lang, block in re.findall(r"^ *```(\w*)\n(.*?)^ *```", README, re.M | re.S)
    if lang == "sh"
]


def block_starting(first_command: str) -> str:
    (block,) = [b for b in BLOCKS if b.strip().startswith(first_command)]
    return block


def commands(block: str) -> list[str]:
    """The block's commands: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


WALKED = (
    "make demo",
    "persona up",
    "persona experiments",
    "ray up cluster.yaml",
    "TOKEN=$(openssl",
    "persona cassandra start",
    "make bench",
)


def test_every_command_block_is_walked():
    for block in BLOCKS:
        claimed = [w for w in WALKED if block.strip().startswith(w)]
        assert len(claimed) == 1, f"no walker (or several) for README block:\n{block}"


def session_env(**extra) -> dict:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **{k: str(v) for k, v in extra.items()},
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # the README says when to export it
    return env


def run_block(script: str, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """bash -e over the block, in a session of its own that is killed afterwards."""
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_session(sid: int) -> None:
    from jobs.local import session_members

    for _ in range(20):
        members = [pid for pid in session_members(sid) if pid != os.getpid()]
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def checkout_copy(tmp_path: Path) -> Path:
    """The tracked files, as a fresh clone has them (the walk writes data/ there)."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    root = tmp_path / "checkout"
    for name in files:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, target)
    return root


def test_the_two_make_targets_exist_as_the_readme_says():
    # `make demo` runs `persona demo` (tests/test_jobs.py runs it); `make test` is CI.
    for target in (c.split()[1] for c in commands(block_starting("make demo"))):
        planned = subprocess.run(
            ["make", "-n", target], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        assert planned.returncode == 0, planned.stderr
    assert (
        "persona demo"
        in subprocess.run(
            ["make", "-n", "demo"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout
    )


def test_the_benchmark_targets_exist_as_the_readme_says():
    # Running them takes 5 to 15 minutes; bench/RESULTS.md records their last run.
    for target in (c.split()[1] for c in commands(block_starting("make bench"))):
        planned = subprocess.run(
            ["make", "-n", target], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        assert planned.returncode == 0 and "bench.run_all" in planned.stdout


def test_the_ray_job_walkthrough_runs_as_written(tmp_path):
    """persona up, generate, two `ray job submit`s, profile, down: the job finds the
    stack through the data dir `persona up` hands the head (its own copy of the
    working dir has no stack record), and the profile holds every generated event of
    the user, once."""
    block = block_starting("persona up")
    dashboard = free_port()
    env = session_env(
        PERSONA_HTTP_PORT=free_port(),
        PERSONA_RAY_PORT=free_port(),
        PERSONA_DASHBOARD_PORT=dashboard,
        RAY_SERVE_HAPROXY_METRICS_PORT=free_port(),
        RAY_SERVE_HAPROXY_STATS_PORT=free_port(),
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}",
    )
    # No PERSONA_DATA_DIR: the stack's record goes where a newcomer's would, into the
    # checkout's data/ (a fresh clone's in CI), and the job must find it from its copy.
    env.pop("PERSONA_DATA_DIR", None)
    root = checkout_copy(tmp_path)
    try:
        walked = run_block(block, env, root, timeout=600)
    finally:
        # The installed command, as the block ran it: `python -m jobs.cli` in the copy
        # would look for the stack in the copy's data dir and stop nothing.
        persona = str(Path(sys.executable).parent / "persona")
        subprocess.run([persona, "down"], env=env, cwd=root, capture_output=True)
    assert walked.returncode == 0, walked.stdout[-5000:]
    assert walked.stdout.count("succeeded") == 3 and "Ray head stopped" in walked.stdout
    profile_user = commands(block)[-2].split()[-1]
    printed = json.loads(re.search(r"^\{\n.*?^\}", walked.stdout, re.M | re.S).group(0))
    generated = Counter(
        json.loads(line)["user_id"] for line in (root / "data/demo/events.jsonl").open()
    )
    assert printed["user_id"] == profile_user
    assert printed["events"] == generated[profile_user] > 0


def test_the_experiment_commands_run_as_written(tmp_path):
    """Against a running `persona up` (the block's commands need one): list, results,
    the plot, a live change of shares with a new variant, a second experiment, and
    the exposure export."""
    block = block_starting("persona experiments")
    env = session_env(
        PERSONA_HTTP_PORT=free_port(),
        PERSONA_RAY_PORT=free_port(),
        PERSONA_DASHBOARD_PORT=free_port(),
        RAY_SERVE_HAPROXY_METRICS_PORT=free_port(),
        RAY_SERVE_HAPROXY_STATS_PORT=free_port(),
        PERSONA_DATA_DIR=tmp_path / "stack",
    )
    root = checkout_copy(tmp_path)
    persona = str(Path(sys.executable).parent / "persona")
    try:
        up = subprocess.run([persona, "up"], env=env, cwd=root, capture_output=True, text=True)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        api = json.loads((tmp_path / "stack" / "up.json").read_text())["api"]
        # Something to report on: a recommendation shown and clicked.
        subprocess.run(
            ["curl", "-sf", f"{api}/v1/users/walker/recommendations?k=3"], check=True, timeout=60
        )
        walked = run_block(block, env, root, timeout=300)
    finally:
        subprocess.run([persona, "down"], env=env, cwd=root, capture_output=True)
    assert walked.returncode == 0, walked.stdout[-5000:]
    assert (root / "docs" / "experiment.png").stat().st_size > 0
    assert "trial" in walked.stdout and "new-ranker" in walked.stdout
    exported = [json.loads(line) for line in (root / "exposures.jsonl").open()]
    assert any(e["user_id"] == "walker" for e in exported)


def test_the_cluster_commands_parse_with_rays_own_cli():
    """`ray up/exec/down cluster.yaml` need a cloud account: Ray's CLI parses each line
    exactly as written (a usage error such as `ray attach ... -- cmd` fails here)."""
    import click
    from ray.scripts.scripts import cli

    for command in commands(block_starting("ray up cluster.yaml")):
        words = shlex.split(command.replace("<head>", "head.example"))
        assert words[0] == "ray"
        context = cli.make_context("ray", words[1:2], resilient_parsing=False)
        sub = cli.get_command(context, words[1])
        if sub.name == "job":
            sub = sub.get_command(context, words[2])
            args = words[3:]
        else:
            args = words[2:]
        try:
            sub.make_context(words[1], list(args))
        except click.UsageError as exc:
            raise AssertionError(f"README command does not parse: {command}\n{exc}") from exc
        if sub.name in ("up", "exec", "down"):
            assert (PROJECT_ROOT / args[0]).exists()


def test_the_local_serve_walkthrough_runs_as_written(tmp_path):
    """ray start, serve deploy serve.yaml (bound to 0.0.0.0, so it needs the token the
    block makes), the catalog, an event, profile, recommendations, delete."""
    block = block_starting("TOKEN=$(openssl")
    http, dashboard, gcs = free_port(), free_port(), free_port()
    root = checkout_copy(tmp_path)
    serve_yaml = root / "serve.yaml"
    serve_yaml.write_text(
        serve_yaml.read_text()
        .replace("port: 8000", f"port: {http}")
        .replace("port: 9000", f"port: {free_port()}")
    )
    script = block.replace("localhost:8000", f"localhost:{http}").replace(
        "ray start --head",
        f"ray start --head --port={gcs} --dashboard-port={dashboard} "
        f"--dashboard-agent-listen-port={free_port()} --ray-client-server-port={free_port()}",
    )
    env = session_env(
        RAY_DASHBOARD_ADDRESS=f"http://127.0.0.1:{dashboard}",
        PERSONA_DATA_DIR=tmp_path / "data",
        RAY_SERVE_HAPROXY_METRICS_PORT=free_port(),
        RAY_SERVE_HAPROXY_STATS_PORT=free_port(),
        RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=free_port(),
    )
    # serve deploy returns before the app runs: the first curl waits for it (as an
    # operator watching `serve status` would), then every line runs as written.
    first_curl = script.index("curl")
    script = (
        script[:first_curl]
        + f"for i in $(seq 240); do curl -sf localhost:{http}/healthz >/dev/null && break; "
        + "sleep 1; done\n"
        + script[first_curl:]
    )
    walked = run_block(script, env, root, timeout=600)
    assert walked.returncode == 0, walked.stdout[-5000:]
    out = walked.stdout
    assert '"applied":1' in out.replace(" ", "")
    assert '"user_id":"ann"' in out.replace(" ", "")
    assert out.rstrip().endswith("204")


def test_the_local_cassandra_commands_run_as_written(tmp_path):
    """start, status, stop on a node of their own (ports and data dir of this test),
    never the suite's node."""
    block = block_starting("persona cassandra start")
    env = session_env(
        PERSONA_DATA_DIR=tmp_path,
        PERSONA_CASSANDRA_PORT=free_port(),
        PERSONA_CASSANDRA_STORAGE_PORT=free_port(),
    )
    walked = run_block(block, env, PROJECT_ROOT, timeout=300)
    assert walked.returncode == 0, walked.stdout[-5000:]
    after = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "cassandra", "status"], env=env, capture_output=True
    )
    assert after.returncode != 0, "stop leaves no node answering"

"""Runs that survive the real world: stop signals with exact resume, kill -9 of the long stages
with byte-identical resumed output, non-finite losses, failed saves, one writer per output,
hostile records, and no surprise network.

Quick variants run in `make test`; `make soak` sets DISTILLERY_SOAK=1 for the long ones (20
SIGTERM runs, three kills per long stage)."""
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file, save_file

import tiny
from conftest import BIN, read_jsonl, run_bin, write_jsonl

SOAK = os.environ.get("DISTILLERY_SOAK") == "1"
STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with the state saved


def popen(name, *args, env=None):
    return subprocess.Popen([str(BIN / name), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stderr.read()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def wait_for_part(journal, proc, timeout=120):
    """Until the journal has committed its first part: a kill before that leaves nothing to resume."""
    deadline = time.time() + timeout
    def committed():
        try:
            return len(json.loads((journal / "journal.json").read_text())["parts"]) > 0
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    while not committed():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before its first part:\n{proc.stderr.read()}"
        assert time.time() < deadline, f"{journal} never committed a part"
        time.sleep(0.001)


def same_bytes(a, b):
    return a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel-models")
    teacher = tiny.make_model("llama", str(root / "teacher"), seed=0)
    student = root / "student"
    run_bin("kd-init", "--teacher", teacher, "--out", student, "--layers", 1, "--seed", 1, "--device", "cpu")
    return teacher, student


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    words = " ".join(tiny.CORPUS).split()
    recs = [{"id": f"p{i}", "prompt": " ".join(words[i % 50:i % 50 + 2 + i % 5])} for i in range(96)]
    return write_jsonl(tmp_path_factory.mktemp("rel-data") / "prompts.jsonl", recs)


@pytest.fixture(scope="module")
def transfer(models, prompts, tmp_path_factory):
    """A transfer set with stored top-8 logits (also the input of the scoring stages)."""
    out = tmp_path_factory.mktemp("rel-transfer") / "transfer.jsonl"
    run_bin("kd-generate", "--teacher", models[0], "--prompts", prompts, "--out", out, "--max-new-tokens", 8,
            "--temperature", 1.0, "--store-logits", 8, "--batch-size", 8, "--device", "cpu")
    return out


# --- stop signals -------------------------------------------------------------------------

def distill_args(models, data, out, *extra, steps=30):
    return ["--teacher", models[0], "--student", models[1], "--data", data, "--out", out, "--steps", steps,
            "--batch-size", 4, "--lr", 3e-3, "--seed", 1, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def straight_distill(models, transfer, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-straight") / "run"
    start = time.time()
    run_bin("kd-distill", *distill_args(models, transfer, out))
    return out, time.time() - start


def test_sigterm_at_random_moments_resumes_bit_identical(models, transfer, straight_distill, tmp_path):
    """SIGTERM at a random moment: the run finishes its step, saves, exits 75; --resume ends
    with the uninterrupted run's weights, bit for bit."""
    straight, _ = straight_distill
    runs = 20 if SOAK else 2
    rng = random.Random(16)
    stopped = early = 0
    for i in range(runs):
        out = tmp_path / f"run{i}"
        proc = popen("kd-distill", *distill_args(models, transfer, out))
        if i % 4 == 0:
            # While it starts: loading libraries, models and data.
            time.sleep(rng.uniform(0, 1.5))
        else:
            # At a random step (machine load makes wall-clock times meaningless), at a random
            # moment inside it.
            target = rng.randint(1, 28)
            metrics = out / "metrics.csv"
            while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) <= target):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        if proc.returncode == 0:
            continue  # it had finished: nothing to resume
        stopped += 1
        if proc.returncode == -signal.SIGTERM:
            # Signalled while libtorch's libraries were still loading, before main installed
            # the handlers: nothing had started, so nothing may have been written.
            early += 1
            assert not (out / "train_state").exists()
        else:
            assert proc.returncode == STOPPED, err
            assert "stopped by SIGTERM" in err and "--resume" in err, err
        resumed = run_bin("kd-distill", *distill_args(models, transfer, out, "--resume"))
        if "after step" in err:
            step = int(err.split("after step ")[1].split()[0])
            assert f"resuming at step {step}" in resumed.stderr
        assert same_bytes(straight / "model.safetensors", out / "model.safetensors"), f"run {i} differs"
        shutil.rmtree(out)
    print(f"SIGTERM runs: {runs}, stopped and resumed: {stopped} ({early} before main), all bit-identical")
    assert stopped >= max(1, runs // 2)


def test_second_signal_aborts_and_keeps_the_last_state(models, transfer, tmp_path):
    out = tmp_path / "run"
    # Long steps (accumulation), so the second signal comes while the first's step still runs;
    # signals sent back to back would merge into one.
    proc = popen("kd-distill", *distill_args(models, transfer, out, "--save-every", 2, "--grad-accum", 16, steps=6))
    wait_for(out / "train_state" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "second stop signal" in err
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert (out / "train_state" / state["tensors"]).is_file()
    run_bin("kd-distill", *distill_args(models, transfer, out, "--save-every", 2, "--grad-accum", 16, "--resume", steps=6))


def test_finetune_stops_on_sigusr1_and_resumes(models, transfer, tmp_path):
    args = lambda out, *x: ["--model", models[1], "--data", transfer, "--out", out, "--steps", 30, "--batch-size", 4,
                            "--seed", 2, "--device", "cpu", *x]
    run_bin("kd-finetune", *args(tmp_path / "straight"))
    proc = popen("kd-finetune", *args(tmp_path / "run"))
    wait_for(tmp_path / "run" / "metrics.csv", proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate()
    assert proc.returncode == STOPPED and "stopped by SIGUSR1" in err, err
    run_bin("kd-finetune", *args(tmp_path / "run", "--resume"))
    assert same_bytes(tmp_path / "straight" / "model.safetensors", tmp_path / "run" / "model.safetensors")


def test_chain_passes_a_stop_to_its_hop_and_resumes(models, transfer, tmp_path):
    def args(out):
        return ["--teacher", models[0], "--sizes", "layers=1,hidden=32,heads=2,kv-heads=1,intermediate=48", "--data",
                transfer, "--out", out, "--steps", 20, "--seed", 3, "--device", "cpu", "--distill-args", "--save-every 4"]
    run_bin("kd-chain", *args(tmp_path / "straight"))
    proc = popen("kd-chain", *args(tmp_path / "chain"))
    wait_for(tmp_path / "chain" / "hop1" / "model" / "train_state" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == STOPPED, err
    assert "kd-distill saved its state and stopped" in err, err
    run_bin("kd-chain", *args(tmp_path / "chain"))
    rel = "hop1/model/model.safetensors"
    assert same_bytes(tmp_path / "straight" / rel, tmp_path / "chain" / rel)


# --- kill -9 of the long stages -----------------------------------------------------------

def stage_cases(models, prompts, transfer):
    teacher, student = models
    many = transfer.parent / "many.jsonl"
    if not many.exists():
        recs = read_jsonl(transfer)
        write_jsonl(many, [{**r, "id": f"{r['id']}-{k}"} for k in range(COPIES) for r in recs])
    many_prompts = transfer.parent / "many_prompts.jsonl"
    if not many_prompts.exists():
        write_jsonl(many_prompts, [{**r, "id": f"{r['id']}-{k}"} for k in range(COPIES) for r in read_jsonl(prompts)])
    return {
        "generate": ("kd-generate", "out.jsonl", ["--teacher", teacher, "--prompts", prompts, "--max-new-tokens", 8,
                                                  "--temperature", 1.0, "--store-logits", 8, "--batch-size", 4]),
        "score": ("kd-generate", "out.jsonl", ["--teacher", teacher, "--prompts", many, "--score", "--store-logits", 8,
                                               "--batch-size", 4]),
        "filter": ("kd-filter", "out.jsonl", ["--teacher", teacher, "--student", student, "--data", many,
                                              "--select", "kl_teacher_student:top:0.5", "--batch-size", 4]),
        "eval": ("kd-eval", "out.json", ["--model", student, "--teacher", teacher, "--data", many, "--batch-size", 2]),
        "augment": ("kd-augment", "out.jsonl", ["--data", many_prompts, "--ops", "infill", "--teacher", teacher,
                                                "--max-new-tokens", 4, "--batch-size", 4, "--seed", 4]),
    }


# Enough copies of the inputs that no stage ends between its first committed part and the
# kill, even on an idle machine (a tiny model does a batch in about a millisecond).
COPIES = 6
# Small journal parts, so that small inputs still make several.
SMALL_PARTS = {"DISTILLERY_JOURNAL_ITEMS": "8"}
TIMING_KEYS = {"eval_seconds", "perplexity_seconds", "perplexity_tokens_per_second", "peak_rss_bytes"}


def outputs(d, name):
    """The stage's finished files (kd-eval's timing fields aside, which no two runs share)."""
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    if name == "out.json":
        m = json.loads(files[name])
        files[name] = json.dumps({k: v for k, v in m.items() if k not in TIMING_KEYS}, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("stage", ["generate", "score", "filter", "eval", "augment"])
def test_killed_long_stage_resumes_byte_identical(stage, models, prompts, transfer, tmp_path):
    binary, name, args = stage_cases(models, prompts, transfer)[stage]
    args = [*args, "--device", "cpu"]
    (tmp_path / "straight").mkdir()
    run_bin(binary, *args, "--out", tmp_path / "straight" / name)
    want = outputs(tmp_path / "straight", name)
    rng = random.Random(stage)
    for attempt in range(3 if SOAK else 1):
        d = tmp_path / f"killed{attempt}"
        d.mkdir()
        out = d / name
        proc = popen(binary, *args, "--out", out, env=SMALL_PARTS)
        wait_for_part(d / f"{name}.journal", proc)
        time.sleep(rng.uniform(0, 0.01))
        assert proc.poll() is None, "the stage finished before it could be killed; give it more work"
        proc.kill()
        proc.wait()
        assert not out.exists(), "an output appeared before the stage finished"
        refused = run_bin(binary, *args, "--out", out, check=False)
        assert refused.returncode == 1 and "add --resume" in refused.stderr
        resumed = run_bin(binary, *args, "--out", out, "--resume", env=SMALL_PARTS)
        done = int(resumed.stderr.split(": ")[1].split(" items already done")[0])
        assert done >= 8, resumed.stderr
        assert outputs(d, name) == want, f"{stage}: resumed output differs"
        assert not (d / f"{name}.journal").exists() and not (d / f"{name}.lock").exists()


# --- non-finite losses --------------------------------------------------------------------

@pytest.fixture(scope="module")
def poisoned(transfer, tmp_path_factory):
    """24 records whose stored teacher rows are NaN for one of them: a corrupt sidecar, a real
    cause of a NaN loss on exactly the steps that meet that record."""
    d = tmp_path_factory.mktemp("rel-nan")
    recs = read_jsonl(transfer)[:24]
    data = write_jsonl(d / "train.jsonl", recs)
    tensors = load_file(str(transfer) + ".logits.safetensors")
    bad = recs[9]["teacher_logits"]
    tensors["logprobs"][bad["row"]:bad["row"] + bad["rows"]] = float("nan")
    sidecar = d / "poisoned.safetensors"
    save_file(tensors, sidecar, metadata={"format": "pt"})
    return data, sidecar, recs[9]["id"]


def offline(models, data, sidecar, out, *extra):
    return ["--student", models[1], "--data", data, "--teacher-logits", sidecar, "--out", out, "--alpha", 0.5, "--beta", 0.5,
            "--steps", 24, "--batch-size", 1, "--seed", 5, "--device", "cpu", *extra]


def test_nan_loss_stops_naming_step_and_records_then_skips(models, poisoned, tmp_path):
    data, sidecar, bad_id = poisoned
    out = tmp_path / "stop"
    proc = run_bin("kd-distill", *offline(models, data, sidecar, out), check=False)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "non-finite loss" in err and f"on records {bad_id}" in err and "kd NaN" in err, err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert f"the state after step {step - 1}" in err
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == step - 1
    # The same run allowed one skip goes through, and so does the stopped one resumed with it.
    skipped = tmp_path / "skip"
    proc = run_bin("kd-distill", *offline(models, data, sidecar, skipped, "--skip-nonfinite", 1))
    assert f"step {step}: non-finite" in proc.stderr and "skipped (1 of 1 allowed)" in proc.stderr
    assert "1 non-finite step(s) skipped" in proc.stdout
    run_bin("kd-distill", *offline(models, data, sidecar, out, "--skip-nonfinite", 1, "--resume"))
    assert same_bytes(skipped / "model.safetensors", out / "model.safetensors")
    # Skipped steps never reach the weights.
    assert all(not t.isnan().any() for t in load_file(skipped / "model.safetensors").values())


# --- failed saves -------------------------------------------------------------------------

def can_mount():
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not can_mount(), reason="needs root and mount(8) for a read-only or tiny file system")
def test_read_only_state_dir_keeps_the_previous_checkpoint(models, transfer, straight_distill, tmp_path):
    straight, _ = straight_distill
    out = tmp_path / "run"
    args = distill_args(models, transfer, out, "--save-every", 10)
    proc = popen("kd-distill", *args)
    wait_for(out / "train_state" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert proc.returncode == STOPPED
    state_dir = out / "train_state"
    step = json.loads((state_dir / "state.json").read_text())["step"]
    subprocess.run(["mount", "--bind", state_dir, state_dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", state_dir], check=True)
        failed = run_bin("kd-distill", *args, "--resume", check=False)
    finally:
        subprocess.run(["umount", state_dir], check=True)
    assert failed.returncode == 1
    assert f"failed; the checkpoint of step {step} in {state_dir} is intact" in failed.stderr, failed.stderr
    assert "Read-only file system" in failed.stderr
    assert json.loads((state_dir / "state.json").read_text())["step"] == step
    run_bin("kd-distill", *args, "--resume")
    assert same_bytes(straight / "model.safetensors", out / "model.safetensors")


@pytest.mark.skipif(not can_mount(), reason="needs root and mount(8) for a read-only or tiny file system")
def test_full_disk_is_seen_before_the_save(models, transfer, straight_distill, tmp_path):
    straight, _ = straight_distill
    one_save = sum(p.stat().st_size for p in [straight / "model.safetensors", *(straight / "train_state").glob("*.safetensors")])
    disk = tmp_path / "tiny"
    disk.mkdir()
    size = (int(one_save * 1.6) // 4096 + 1) * 4096
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], check=True)
    try:
        out = disk / "run"
        failed = run_bin("kd-distill", *distill_args(models, transfer, out, "--save-every", 10), check=False)
        assert failed.returncode == 1
        assert "not enough free space" in failed.stderr and "not saving step 20" in failed.stderr, failed.stderr
        assert "the checkpoint of step 10" in failed.stderr and "is intact" in failed.stderr
        shutil.copytree(out, tmp_path / "moved")
    finally:
        subprocess.run(["umount", disk], check=True)
    moved = tmp_path / "moved"
    (moved / "run.lock").unlink(missing_ok=True)
    run_bin("kd-distill", *distill_args(models, transfer, moved, "--save-every", 10, "--resume"))
    assert same_bytes(straight / "model.safetensors", moved / "model.safetensors")


def test_keep_last_rotates_checkpoints(models, transfer, tmp_path):
    out = tmp_path / "run"
    run_bin("kd-distill", *distill_args(models, transfer, out, "--save-every", 3, "--keep-last", 2, steps=12))
    names = sorted(p.name for p in (out / "train_state").iterdir())
    assert names == ["state-00000009.json", "state-00000009.safetensors", "state-00000012.json",
                     "state-00000012.safetensors", "state.json"]


# --- one writer per output ----------------------------------------------------------------

def test_second_writer_is_refused_and_a_crashed_lock_is_taken_over(models, transfer, tmp_path):
    out = tmp_path / "run"
    first = popen("kd-distill", *distill_args(models, transfer, out, "--save-every", 5, steps=5000))
    wait_for(out / "train_state" / "state.json", first)
    second = run_bin("kd-distill", *distill_args(models, transfer, out, "--resume"), check=False)
    assert second.returncode == 1
    assert f"being written by another process (pid {first.pid})" in second.stderr, second.stderr
    assert first.poll() is None
    first.kill()
    first.wait()
    assert (tmp_path / "run.lock").exists()  # left by the crash, but no longer held
    step = json.loads((out / "train_state" / "state.json").read_text())["step"]
    run_bin("kd-distill", *distill_args(models, transfer, out, "--resume", steps=step + 1))
    assert not (tmp_path / "run.lock").exists()
    gen = run_bin("kd-generate", "--teacher", models[0], "--prompts", transfer, "--out", tmp_path / "x.jsonl",
                  "--max-new-tokens", 1, "--device", "cpu")
    assert gen.returncode == 0 and not (tmp_path / "x.jsonl.lock").exists()


# --- hostile records and the hub ----------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "a\x00b"}\n', "bad.jsonl:2: NUL byte"),
    (b'{"id": "a", "text": "caf\xc3\x28"}\n', "bad.jsonl:1: not valid UTF-8"),
    (b'{"id": "a", "text": "x", "id": "b"}\n', "duplicate key `id`"),
    (b'{"id": "a", "x": ' + b"[" * 300 + b"]" * 300 + b"}\n", "recursion limit exceeded"),
])
def test_hostile_records_are_named(content, message, models, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    proc = run_bin("kd-eval", "--model", models[1], "--data", data, "--out", tmp_path / "m.json", "--device", "cpu",
                   check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr


def test_paths_never_reach_the_hub_and_tokens_are_not_printed(text_data, tmp_path):
    proc = run_bin("kd-eval", "--model", "runs/no/such/model", "--data", text_data, "--out", tmp_path / "m.json",
                   "--device", "cpu", check=False)
    assert proc.returncode == 1 and "is not a hub id, so the hub is not asked" in proc.stderr
    secret = "hf_distillery_test_token_0123456789"
    env = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": secret, "HF_HOME": str(tmp_path / "hf")}
    start = time.time()
    proc = run_bin("kd-eval", "--model", "nobody/no-model", "--data", text_data, "--out", tmp_path / "m.json",
                   "--device", "cpu", check=False, env=env)
    assert proc.returncode == 1 and "offline hub cache" in proc.stderr, proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert time.time() - start < 30

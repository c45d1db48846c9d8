"""Many workers, one table: torchrun with 2 gloo processes, and independent shard jobs joined by merge."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import streamlens as sl
from streamlens.cli import main
from streamlens.report.demo import pydoc_texts
from streamlens.skip.shards import merge_shards

TEXTS = [t[:300] for t in pydoc_texts()[:7]]
KW = {"max_tokens": 20, "batch_size": 2, "n_boot": 200}


def _same_table(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype.kind == "f":
            torch.testing.assert_close(torch.tensor(a[col].values), torch.tensor(b[col].values), atol=0, rtol=0,
                                       equal_nan=True)
        else:
            assert list(a[col]) == list(b[col]), col


def _torchrun(args, tmp_path, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *args]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(sl.__file__).parent.parent)}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    import streamlens as sl
    dist.init_process_group("gloo")
    folder, data, out, fail = sys.argv[1:5]
    if fail == str(dist.get_rank()):
        raise SystemExit("rank %d: a planned failure" % dist.get_rank())
    texts = json.load(open(data))
    import torch
    from streamlens.intervene import means
    calls = []  # the batches whose write sums this rank computed: its share of the mean pass
    wrapped = means.batch_write_sums
    means.batch_write_sums = lambda model, batch: (calls.append(batch.input_ids[:, 0].tolist()), wrapped(model, batch))[1]
    ev = sl.LayerSkipEvaluator(sl.load(folder), texts, max_tokens=20, batch_size=2, n_boot=200, progress=False)
    sweep = ev.sweep("head", mode="mean", metrics=("kl", "ce", "top1", "angle"))
    torch.save({"means": {str(k): v for k, v in ev.means.items()}, "calls": len(calls)}, out + ".means%d.pt" % dist.get_rank())
    one = sl.LayerSkipEvaluator(ev.model, texts[:2], max_tokens=20, batch_size=2, n_boot=200, progress=False)
    torch.save({str(k): v for k, v in one.ensure_means().items()}, out + ".one%d.pt" % dist.get_rank())  # 1 batch, 2 ranks
    blocks = ev.sweep("block", metrics=("kl", "ce"))
    sweep.to_dataframe().to_pickle(out + ".rank%d.pkl" % dist.get_rank())
    blocks.to_dataframe().to_pickle(out + ".blocks%d.pkl" % dist.get_rank())
    from streamlens.skip import streaming as smod
    batches = []  # each pruning step's streaming pass is sharded too: the clean passes this rank ran
    real = smod.clean_pass
    smod.clean_pass = lambda model, batch, sel, lo, *a, **k: (batches.append(lo), real(model, batch, sel, lo, *a, **k))[1]
    curve = ev.prune(2, unit="head", mode="mean", out=out + ".curve.csv")
    curve.to_dataframe().to_pickle(out + ".curve%d.pkl" % dist.get_rank())
    json.dump(batches, open(out + ".batches%d.json" % dist.get_rank(), "w"))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_table(tiny_models, tiny_dirs, tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    r = _torchrun(["run.py", str(tiny_dirs("gpt2")), "texts.json", str(tmp_path / "t"), "none"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS, progress=False, **KW)
    single = ev.sweep("head", mode="mean", metrics=("kl", "ce", "top1", "angle")).to_dataframe()
    blocks = ev.sweep("block", metrics=("kl", "ce")).to_dataframe()
    curve = ev.prune(2, unit="head", mode="mean", out=tmp_path / "single_curve.csv").to_dataframe()
    for rank in (0, 1):  # every rank returns the whole table
        got = torch.load(tmp_path / f"t.means{rank}.pt")
        # the mean pass is sharded (4 batches: 2 per rank) and its result is the single process's, bit for bit
        assert got["calls"] == 2
        assert set(got["means"]) == {str(k) for k in ev.means}
        for k, v in ev.means.items():
            torch.testing.assert_close(got["means"][str(k)], v, atol=0, rtol=0)
        one = sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS[:2], progress=False, **KW).ensure_means()
        got = torch.load(tmp_path / f"t.one{rank}.pt")  # fewer batches than ranks: rank 1 computes none
        assert set(got) == {str(k) for k in one}
        for k, v in one.items():
            torch.testing.assert_close(got[str(k)], v, atol=0, rtol=0)
        _same_table(pd.read_pickle(tmp_path / f"t.rank{rank}.pkl"), single)
        _same_table(pd.read_pickle(tmp_path / f"t.blocks{rank}.pkl"), blocks)
        _same_table(pd.read_pickle(tmp_path / f"t.curve{rank}.pkl"), curve)
        # 3 steps (0, 1, 2), each over this rank's 2 of the 4 batches (documents 0, 4 on rank 0; 2, 6 on rank 1)
        assert json.loads((tmp_path / f"t.batches{rank}.json").read_text()) == [2 * rank, 2 * rank + 4] * 3
    _same_table(pd.read_csv(tmp_path / "t.curve.csv"), pd.read_csv(tmp_path / "single_curve.csv"))
    # a rank that fails is an error naming it, not a hang
    r = _torchrun(["run.py", str(tiny_dirs("gpt2")), "texts.json", str(tmp_path / "f"), "1"], tmp_path, timeout=300)
    assert r.returncode != 0 and "rank 1: a planned failure" in r.stderr + r.stdout


@pytest.mark.slow
def test_torchrun_cli_writes_the_single_process_table(tiny_models, tiny_dirs, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    args = ["sweep", str(tiny_dirs("llama")), "--data", str(data), "--unit", "attn", "--max-tokens", "20",
            "--batch-size", "2"]
    r = _torchrun(["-m", "streamlens", *args, "--out", "multi.csv"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "single.csv")]) == 0
    _same_table(pd.read_csv(tmp_path / "multi.csv"), pd.read_csv(tmp_path / "single.csv"))
    assert len(list(tmp_path.glob("multi.csv.docsums-*of2.jsonl"))) == 2


def test_shard_jobs_merge_to_the_single_process_table(tiny_models, tmp_path, capsys):
    m = tiny_models("llama")
    ev = sl.LayerSkipEvaluator(m, TEXTS, progress=False, **KW)
    for unit, mode in (("block", "skip"), ("head", "mean")):
        single = ev.sweep(unit, mode=mode, metrics=("kl", "ce", "top1", "topk"),
                          out=tmp_path / f"{unit}_single.csv").to_dataframe()
        files = [ev.sweep_shard(unit, shard=f"{i}/3", out=tmp_path / f"{unit}{i}.jsonl", mode=mode,
                                metrics=("kl", "ce", "top1", "topk")) for i in (2, 0, 1)]
        merged = merge_shards(files, out=tmp_path / f"{unit}.csv")
        _same_table(merged.to_dataframe(), single)
        _same_table(pd.read_csv(tmp_path / f"{unit}.csv"), pd.read_csv(tmp_path / f"{unit}_single.csv"))
    with pytest.raises(sl.StreamlensError, match=r"shards \[1\] of 3 are missing"):
        merge_shards(files[:2])
    with pytest.raises(sl.StreamlensError, match="are both shard 0/3"):
        merge_shards([files[1], files[1], files[2]])
    other = ev.sweep_shard("head", shard="1/3", out=tmp_path / "other.jsonl", mode="skip", metrics=("kl", "ce", "top1", "topk"))
    with pytest.raises(sl.StreamlensError, match="cannot merge other.jsonl with head2.jsonl: .*mode: 'skip' in other.jsonl, 'mean' in head2.jsonl"):
        merge_shards([files[0], other, files[2]])
    lines = files[1].read_text().splitlines()
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(sl.StreamlensError, match="unfinished.jsonl lacks unit .* has not finished"):
        merge_shards([files[0], unfinished, files[2]])
    # the command line: one job per shard, then merge
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    with pytest.raises(sl.StreamlensError, match="shard must be 'i/n'"):
        ev.sweep_shard("block", shard="2/2", out=tmp_path / "x.jsonl")
    assert main(["merge", str(files[0]), str(files[1]), str(files[2]), "--out", str(tmp_path / "cli.csv")]) == 0
    _same_table(pd.read_csv(tmp_path / "cli.csv"), pd.read_csv(tmp_path / "head.csv"))
    assert main(["merge", str(files[0])]) == 1 and "missing" in capsys.readouterr().err


def test_merge_has_help_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0 and "streamlens merge part0.jsonl" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_expert_mean_sweep_is_the_single_process_table(tmp_path):
    """The experts' mean shares are computed on first use; under torchrun the ranks share that pass too."""
    from streamlens.testing import build_bridged

    folder, _ = build_bridged("MixtralForCausalLM", tmp_path / "mixtral")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    args = ["sweep", str(folder), "--data", str(data), "--unit", "expert", "--mode", "mean", "--max-tokens", "12",
            "--batch-size", "2", "--metrics", "kl,ce"]
    r = _torchrun(["-m", "streamlens", *args, "--out", "multi.csv"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "single.csv")]) == 0
    multi, single = pd.read_csv(tmp_path / "multi.csv"), pd.read_csv(tmp_path / "single.csv")
    assert len(single) >= 4 and float(single["kl"].max()) > 0
    _same_table(multi, single)

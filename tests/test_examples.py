"""Every example runs with --quick and prints what it claims (parsed from its output)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*=?\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)", text)
    assert match, f"{label!r} not in output:\n{text}"
    return float(match.group(1))


def test_every_example_is_covered_here():
    tested = {
        "quickstart.py",
        "bayesian_tilt.py",
        "bayesian_ngram.py",
        "stdlib_charlm.py",
        "partition_estimation.py",
        "lookahead.py",
        "student_posterior.py",
        "paper_reproduction.py",
        "constrained_json.py",
        "twisted_constraints.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart():
    text = run_example("quickstart.py")
    assert "all digit sums divisible by 3: True" in text
    assert abs(number_after("max |log p_ARM - log p_EBM| on 100 samples:", text)) < 1e-4
    assert abs(number_after("log sum_y p_ARM(y) over all sequences:", text)) < 1e-5
    assert 0 < number_after("P_reference(digit sum ≡ 0 mod 3)", text) < 1
    assert number_after("to_ebm(to_arm(target)): log Z", text) == number_after("log Z", text)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.slow  # make test's budget; NUTS on a tilt: test_inference.py
def test_bayesian_tilt():
    text = run_example("bayesian_tilt.py")
    means = [float(m) for m in re.findall(r"^beta\s+(-?[0-9.]+)", text, re.M)]
    assert len(means) == 2 and abs(means[0] - means[1]) < 0.05, means
    assert abs(means[0] - 0.7) < 0.3
    ranking = [line.split()[0] for line in text.split("model comparison")[1].splitlines()[2:5]]
    assert ranking[-1] == "wrong", ranking


@pytest.mark.filterwarnings("ignore")
@pytest.mark.slow  # make test's budget; its parts are tested fast elsewhere
def test_bayesian_ngram():
    text = run_example("bayesian_ngram.py")
    assert number_after("max r_hat", text) < 1.05
    assert number_after("max |posterior mean SVI - NUTS| =", text) < 0.5
    nuts = number_after("NUTS posterior predictive", text)
    mle = number_after("maximum likelihood (sp.fit)", text)
    truth = number_after("true bigram", text)
    assert mle < nuts < truth  # 80 sequences: the posterior predictive beats the plug-in MLE


@pytest.mark.slow  # make test's budget; its parts are tested fast elsewhere
def test_stdlib_charlm():
    text = run_example("stdlib_charlm.py")
    unigram = number_after("unigram (counts)        held-out bits/char:", text)
    trigram = number_after("trigram (Markov(2))     held-out bits/char:", text)
    transformer = number_after("transformer N=2 D=64    held-out bits/char:", text)
    assert 4.0 < unigram < 5.5 and trigram < unigram - 1.0 and transformer < unigram


@pytest.mark.slow  # make test's budget; the estimators: test_partition.py
def test_partition_estimation():
    text = run_example("partition_estimation.py")
    exact = number_after("exact log Z =", text)
    for name in ("IS, bigram proposal", "SMC, no twist", "SMC, exact twist"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        log_z, stderr, z_score = (float(v) for v in line[len(name) :].split()[:3])
        assert abs(z_score) <= 4 and abs(log_z - exact) <= 4 * stderr, line
    assert number_after("k-hat =", text) > 0.7 and "EstimateWarning: " in text
    assert number_after("|IS - SMC| / combined stderr =", text) <= 4


@pytest.mark.slow  # make test's budget; the same task and student: the demo's test in test_cli.py
def test_lookahead():
    text = run_example("lookahead.py")
    assert text.count("all digit sums divisible by 3 (4096 samples): True") == 2
    assert number_after("max |log p_ARM - log p_EBM| over the support", text) < 1e-4
    constrained = float(text.split("(ii)")[1].split("KL(student ‖ target) =")[1].split()[0])
    assert constrained > 0.1  # the constrained decoder is measurably off the target
    assert number_after("KL reduction by distillation:", text) >= 5
    assert number_after("share of the constrained decoder's KL in the second half:", text) > 0.5
    mc = re.search(r"reverse KL: ([0-9.]+) \[([0-9.]+), ([0-9.]+)\] \(exact ([0-9.]+)\)", text)
    estimate, low, high, exact = (float(g) for g in mc.groups())
    assert abs(estimate - exact) <= 4 * (high - low) / (2 * 1.96)


@pytest.mark.slow  # make test's budget; its parts are tested fast elsewhere
def test_student_posterior():
    text = run_example("student_posterior.py")
    rows = {}
    for line in text.split("split (Var = between² + mc²):")[1].splitlines()[2:4]:
        name, values = line[:12].strip(), [float(v) for v in line[12:].split()]
        rows[name] = dict(
            zip(["mean", "sd", "mc_sd", "between_sd", "students"], values, strict=True)
        )
    constrained = number_after("constrained decoder: KL =", text)
    assert rows["task lattice"]["mean"] < rows["unigram"]["mean"] < constrained
    assert all(row["mc_sd"] > 0 for row in rows.values())
    assert "kl_reverse[unigram]" in text


@pytest.mark.slow  # make test's budget; reproduce: test_models.py and test_cli.py
def test_paper_reproduction(tmp_path):
    """Also the files `seqppl reproduce` writes (the command line's wiring: test_cli.py)."""
    text = run_example("paper_reproduction.py", "--out", str(tmp_path))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,arm_gap,ebm_gap,before_map,after_map,kl,bound"
    table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert np.all(table[:, 1:3] > -1e-4)  # risks are at least the entropy
    assert np.all(table[:, 5] <= table[:, 6])  # kl <= 2T * after-map distance
    np.testing.assert_allclose(table[:, 6], 2 * 4 * table[:, 4], rtol=1e-4)
    assert (tmp_path / "panels.png").stat().st_size > 0
    assert "kl ≤ bound at every logged step: True" in (tmp_path / "summary.md").read_text()
    assert "kl <= bound at every logged step: True" in text
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s", line)]
    first, last = (float(rows[0][1]), float(rows[0][2])), (float(rows[-1][1]), float(rows[-1][2]))
    assert last[0] < first[0] / 50 and last[1] < first[1] / 50  # both gaps fall
    assert number_after("after-map distance", text) > 1.5


def test_constrained_json():
    """Exact samples are valid documents; myopic masking runs away on the schema, feasible
    masking is valid but off the target, the exact M is the target."""
    text = run_example("constrained_json.py")
    assert "all valid under the schema: True" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[-4:-1]}
    assert set(rows) == {"myopic", "feasible", "exact"}, rows
    assert float(rows["myopic"][2]) > 0.5  # P(invalid): the length limit, never closed
    assert float(rows["feasible"][2]) == 0 and float(rows["feasible"][0]) > 0.1
    assert float(rows["exact"][1]) == 0 and float(rows["exact"][3]) == 0  # "exact M" splits


def test_twisted_constraints():
    """Every estimate covers the exact log Z (4 se); the twisted samplers accept most of their
    particles and their weighted particles are closer to the exact target than the untwisted."""
    text = run_example("twisted_constraints.py")
    exact = number_after("exact log Z =", text)
    assert -20 < exact < 0
    rows = {}
    for name in ("SMC, no twist", "SMC, lattice twist", "SMC, lattice values"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        log_z, stderr, z_score, tv, accepted = (float(v) for v in line[len(name) :].split())
        rows[name] = {"tv": tv, "accepted": accepted}
        if name != "SMC, no twist":  # the untwisted run may have accepted nothing at all
            assert abs(log_z - exact) <= 4 * stderr and abs(z_score) <= 4, line
    for name in ("SMC, lattice twist", "SMC, lattice values"):
        assert rows[name]["accepted"] > 0.5 > rows["SMC, no twist"]["accepted"], rows
        assert rows[name]["tv"] < rows["SMC, no twist"]["tv"], rows

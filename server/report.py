"""The run folder: metrics.json, report.md and the plots, built from what the coordinator saw."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import messages as m  # noqa: E402
from common.config import JobConfig  # noqa: E402
from common.accounting import institution_epsilon  # noqa: E402
from server.round_log import RoundLog  # noqa: E402
from server.strategy import secagg_shares  # noqa: E402
from server.run_folder import METRICS_FILE, PRIVACY_FILE  # noqa: E402
from server.update_checks import AGGREGATE, SENTENCES  # noqa: E402

ACCOUNTANT_NAMES = {"rdp": "Rényi DP (Opacus RDPAccountant)", "prv": "PRV (Opacus PRVAccountant)"}


def build_metrics(job: JobConfig, evaluations: dict[int, dict], round_log: RoundLog, extra: dict) -> dict:
    names = round_log.institutions()
    rounds = []
    for rnd in sorted(evaluations):
        replies = round_log.replies.get(rnd, {})
        sent = [round_log.bytes_of(rnd, name) for name in names]
        rounds.append(
            {
                "round": rnd,
                **evaluations[rnd],
                # the rest of a round's wall time is coordination: polling, process starts, SecAgg+
                "slowest_training_seconds": max((r[m.TRAIN_SECONDS] for r in replies.values()), default=None),
                "bytes_down": sum(down for down, _ in sent),
                "bytes_up": sum(up for _, up in sent),
                "epsilon": {name: r[m.EPSILON] for name, r in replies.items()},
                # who was asked to train (federation.fraction_per_round); those not asked released nothing
                "asked": sorted(round_log.name_of(node) for node in round_log.node_bytes.get(rnd, {})),
                "took_part": sorted(replies),
                "declined": round_log.declined.get(rnd, {}),
                "dropped": round_log.dropped.get(rnd, {}),
                "rejected": round_log.rejected.get(rnd, {}),  # institution or "aggregate" -> Rejection code
            }
        )
    institutions_dp = job.institution_dp
    return {
        "rounds": rounds,
        "lost_rounds": [dict(lost, last=lost["round"] == job.federation.rounds)
                        for lost in lost_rounds(round_log, extra.get("sessions", []))
                        if lost["round"] <= job.federation.rounds],
        "voided": [voided_round(round_log, rnd) for rnd in extra.get("voided_rounds", [])],
        "institutions": [_institution(job, round_log, name) for name in names],
        "config": json.loads(job.to_json()),
        "secure_aggregation": job.secure_aggregation.enabled,
        "secure_aggregation_neighbours": secagg_neighbours(job) if job.secure_aggregation.enabled else None,
        "institution_dp": {
            "enabled": institutions_dp.enabled,
            "noise_multiplier": institutions_dp.noise_multiplier,
            "clipping_norm": institutions_dp.clipping_norm,
            "delta": institutions_dp.delta,
            "rounds": extra.get("institution_dp_rounds", 0),
            "epsilon": institution_epsilon(
                institutions_dp.noise_multiplier, extra.get("institution_dp_rounds", 0), institutions_dp.delta
            ),
            "accountant": "rdp",
        } if institutions_dp.enabled else {"enabled": False},
        **extra,
    }


def lost_rounds(round_log: RoundLog, sessions: list[dict]) -> list[dict]:
    """The rounds a coordinator crash cut short: each resumed session redid the round after its checkpoint.

    What an institution released for a lost round is the rise of the job's step count (its ledger's,
    reported with its next update) that no aggregated round accounts for; its ledger counts it.
    """
    lost = []
    for after in sorted({int(session["after_round"]) for session in sessions[1:]}):
        rnd = after + 1
        asked = sorted({name for session in sessions[1:] if int(session["after_round"]) == after
                        for name in session.get("asked", [])})
        released = {name: steps for name in round_log.replies.get(rnd, {})
                    if (steps := unreported_steps(round_log, name, rnd, rnd) or 0) > 0}
        crashes = sum(1 for session in sessions[1:] if int(session["after_round"]) == after)
        lost.append({"round": rnd, "crashes": crashes, "asked": asked, "released_steps": released,
                     # the resumed job's own try at the round: who trained it, who declined it and why
                     "retrained_by": sorted(round_log.replies.get(rnd, {})),
                     "declined_retry": dict(round_log.declined.get(rnd, {}))})
    return lost


def unreported_steps(round_log: RoundLog, name: str, rnd: int, reported_in: int) -> int | None:
    """DP-SGD steps `name` released for round `rnd` that its reply in round `reported_in` (rnd or later)
    reveals: the rise of its job step count (its ledger's) beyond that reply's own steps and its replies
    before `rnd`; None if it has no reply in `reported_in`."""
    reply = round_log.replies.get(reported_in, {}).get(name)
    if reply is None:
        return None
    before = last_reply_before(round_log, name, rnd)
    return int(reply[m.TOTAL_STEPS]) - int(reply[m.STEPS]) - (int(before[m.TOTAL_STEPS]) if before else 0)


def last_reply_before(round_log: RoundLog, name: str, rnd: int) -> dict | None:
    """`name`'s last reply in a round before `rnd` (None: it has none)."""
    before = [replies[name] for r, replies in sorted(round_log.replies.items()) if r < rnd and name in replies]
    return before[-1] if before else None


def voided_round(round_log: RoundLog, rnd: int) -> dict:
    """A round whose released updates bought nothing (the global model stayed as it was): what each
    institution that replied spent on it (steps, and its job epsilon before and after the round, as it
    reported them), and what each that dropped out released for it, as its next round's reply reveals."""
    def epsilon_before(name: str) -> float:
        before = last_reply_before(round_log, name, rnd)
        return float(before[m.EPSILON]) if before else 0.0

    return {
        "round": rnd,
        "dropped": round_log.dropped.get(rnd, {}),
        "spent": {name: {"steps": reply[m.STEPS], "epsilon_before": epsilon_before(name),
                         "epsilon_after": reply[m.EPSILON]}
                  for name, reply in round_log.replies.get(rnd, {}).items()},
        "released_steps": {name: steps for name in round_log.dropped.get(rnd, {})
                           if (steps := unreported_steps(round_log, name, rnd, rnd + 1)) is not None},
    }


def _institution(job: JobConfig, round_log: RoundLog, name: str) -> dict:
    """One institution's account of the job; an institution that declined every round has no figures."""
    history = [(rnd, round_log.replies[rnd][name]) for rnd in sorted(round_log.replies) if name in round_log.replies[rnd]]
    sent = [round_log.bytes_of(rnd, name) for rnd in sorted(round_log.node_bytes)]
    row = {
        "name": name,
        "rounds": len(history),
        "declined_rounds": sorted(rnd for rnd, names in round_log.declined.items() if name in names),
        "requested_epsilon": job.privacy.target_epsilon,
        "bytes_down": sum(down for down, _ in sent),
        "bytes_up": sum(up for _, up in sent),
        "train_seconds": sum(r[m.TRAIN_SECONDS] for _, r in history),
        "epsilon_per_round": {str(rnd): r[m.EPSILON] for rnd, r in history},
        "dataset_epsilon_per_round": {str(rnd): r[m.DATASET_EPSILON] for rnd, r in history},
    }
    if not history:
        return dict(row, **{key: None for key in RELEASE_FIELDS}, epsilon=0.0, steps=0)
    last = history[-1][1]
    return dict(
        row,
        examples=int(last[m.RECORDS]),
        epsilon=last[m.EPSILON],
        dataset_epsilon=last[m.DATASET_EPSILON],
        budget_epsilon=last[m.BUDGET_EPSILON],
        granted_epsilon=last[m.GRANT_EPSILON],
        delta=last[m.DELTA],
        accountant=last[m.ACCOUNTANT],
        noise_multiplier=last[m.NOISE_MULTIPLIER],
        sample_rate=last[m.SAMPLE_RATE],
        max_grad_norm=last[m.MAX_GRAD_NORM],
        steps=int(last[m.TOTAL_STEPS]),
    )


# What only an institution that released something can report.
RELEASE_FIELDS = (
    "examples", "dataset_epsilon", "budget_epsilon", "granted_epsilon", "delta", "accountant", "noise_multiplier", "sample_rate",
    "max_grad_norm",
)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_report(folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _plot_accuracy(folder / "accuracy.png", metrics)
    _plot_epsilon(folder / "epsilon.png", metrics)
    (folder / "report.md").write_text(render_markdown(metrics), encoding="utf-8")
    write_privacy_report(folder, metrics)
    write_json_atomic(folder / METRICS_FILE, metrics)  # last: its presence means the job ended


def write_privacy_report(folder: Path, metrics: dict) -> None:
    """privacy.json and privacy.md; also after every round, so that a crash leaves what was spent."""
    privacy = privacy_report(metrics)
    write_json_atomic(folder / PRIVACY_FILE, privacy)
    tmp = folder / "privacy.md.tmp"
    tmp.write_text(render_privacy_markdown(privacy), encoding="utf-8")
    os.replace(tmp, folder / "privacy.md")


PRIVACY_FIELDS = (
    "name", "examples", "requested_epsilon", "granted_epsilon", "epsilon", "dataset_epsilon", "budget_epsilon", "delta",
    "accountant", "sample_rate",
    "noise_multiplier", "max_grad_norm", "steps", "rounds", "declined_rounds",
)


def privacy_report(metrics: dict) -> dict:
    """What a compliance officer signs off: per institution, what was released and at what cost."""
    return {
        "guarantee": "record-level (example-level) differential privacy, per institution, (epsilon, delta)",
        "mechanism": "DP-SGD (Opacus): Poisson sampling, per-record gradient clipping, Gaussian noise",
        "secure_aggregation": metrics["secure_aggregation"],
        "secure_aggregation_neighbours": metrics.get("secure_aggregation_neighbours"),
        "institution_level_dp": metrics["institution_dp"],
        "rounds_planned": metrics["config"]["federation"]["rounds"],
        "record_count_granularity": m.RECORD_GRANULARITY,
        "what_left_each_institution": WHAT_LEAVES,
        "institutions": [{key: inst[key] for key in PRIVACY_FIELDS} for inst in metrics["institutions"]],
        "declined": {str(r["round"]): r["declined"] for r in metrics["rounds"] if r.get("declined")},
        "dropped": {str(r["round"]): r["dropped"] for r in metrics["rounds"] if r.get("dropped")},
        "rejected": {str(r["round"]): r["rejected"] for r in metrics["rounds"] if r.get("rejected")},
        "job_id": metrics.get("job_id"),
        "rounds_completed": max((r["round"] for r in metrics["rounds"]), default=0),
        "lost_rounds": metrics.get("lost_rounds", []),
        "voided": metrics.get("voided", []),
    }


# Exactly what crosses from an institution to the coordinator, and what covers it.
WHAT_LEAVES = [
    {"what": "its trainable weights after local DP-SGD (with SecAgg+: masked, and unmasked only as part of the sum)",
     "covered_by_epsilon": True},
    {"what": f"its record count rounded up to a multiple of {m.RECORD_GRANULARITY}, as its update's weight "
             "(in clear beside the update, with SecAgg+ too)", "covered_by_epsilon": False},
    {"what": "its privacy terms and spend: budget, grant, epsilon, delta, accountant, noise multiplier, sample rate "
             "(which reveals ceil(records / batch size)), clip norm, steps", "covered_by_epsilon": False},
    {"what": "its training time, rounded up to whole seconds", "covered_by_epsilon": False},
    {"what": "with SecAgg+: the protocol's public keys, encrypted key shares and, for dropouts, their share of masks",
     "covered_by_epsilon": False},
    {"what": "a refusal: a reason code and a fixed sentence (never a record value, column name, path or error text)",
     "covered_by_epsilon": False},
]


def cell(value, spec: str = "") -> str:
    """A table cell; '-' for what an institution that never trained cannot report."""
    if value is None:
        return "-"
    return ACCOUNTANT_NAMES.get(value, value) if isinstance(value, str) else format(value, spec)


def secagg_neighbours(job: JobConfig) -> dict:
    """SecAgg+'s neighbourhood and threshold per round, as Flower's workflow derives them from ours."""
    per_round, shares = job.federation.per_round, secagg_shares(job.federation.per_round)
    neighbours = per_round if isinstance(shares, float) else shares
    share = job.secure_aggregation.reconstruction_threshold
    return {"per_round": per_round, "shares": neighbours, "threshold": max(2, round(share * neighbours)),
            "threshold_if_all": max(2, round(share * per_round))}


def secagg_line(report: dict) -> str:
    if not report["secure_aggregation"]:
        return "off (the coordinator saw each institution's noised update)"
    line = "on (Flower SecAgg+: the coordinator received only masked updates and their sum)"
    hood = report.get("secure_aggregation_neighbours")
    if not hood or hood["shares"] >= hood["per_round"]:
        return line
    return (f"{line}; each institution's masks and key shares went to {hood['shares'] - 1} neighbours of the "
            f"{hood['per_round']} in its round, drawn by the coordinator (SecAgg+'s logarithmic neighbourhood), so "
            f"a coordinator colluding with {hood['threshold']} of an institution's neighbours could unmask its "
            f"update (were every institution a neighbour: {hood['threshold_if_all']} of {hood['per_round'] - 1}); the "
            "update is still covered by its record-level epsilon")


def institution_dp_line(dp: dict) -> str:
    if not dp["enabled"]:
        return "Institution-level DP at the coordinator: off."
    return (
        f"Institution-level DP at the coordinator: on (each institution's round update clipped to L2 norm "
        f"{dp['clipping_norm']:g} by the institution, Gaussian noise multiplier {dp['noise_multiplier']:g} added to "
        f"the average by the coordinator, Flower's DifferentialPrivacyClientSideFixedClipping): epsilon "
        f"{dp['epsilon']:.4f} at delta {dp['delta']:g} over {dp['rounds']} noised rounds, {ACCOUNTANT_NAMES['rdp']}, "
        "adding or removing one institution's whole data set."
    )


def render_privacy_markdown(report: dict) -> str:
    secagg = secagg_line(report)
    lines = [
        "# Privacy report",
        "",
        f"- Job {report.get('job_id') or '-'}: {report.get('rounds_completed', 0)} of {report['rounds_planned']} rounds "
        "completed so far (this report is rewritten after every round).",
        f"- Guarantee: {report['guarantee']}.",
        f"- Mechanism: {report['mechanism']}.",
        "- Every epsilon is computed by the named accountant over the institution's whole released history for "
        "its data set (all jobs, all rounds, all local steps, at the real sampling rate), never summed by hand.",
        f"- Secure aggregation: {secagg}.",
        f"- {institution_dp_line(report['institution_level_dp'])}",
        "",
        "Each institution granted the job at most what its own budget had left, at its own delta and accountant; "
        "the job's request was a request.",
        "",
        f"| institution | records (rounded up to {report['record_count_granularity']}s) | epsilon requested / granted "
        "| epsilon this job | data set epsilon / budget | delta | accountant | sample rate "
        "| noise multiplier | clip norm | steps | rounds | declined rounds |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for inst in report["institutions"]:
        lines.append(
            f"| {inst['name']} | {cell(inst['examples'])} | {inst['requested_epsilon']:g} / "
            f"{cell(inst['granted_epsilon'], '.4f')} | {inst['epsilon']:.4f} | "
            f"{cell(inst['dataset_epsilon'], '.4f')} / {cell(inst['budget_epsilon'], 'g')} | {cell(inst['delta'], 'g')} | "
            f"{cell(inst['accountant'])} | {cell(inst['sample_rate'], '.4f')} | {cell(inst['noise_multiplier'], '.4f')} | "
            f"{cell(inst['max_grad_norm'], 'g')} | {inst['steps']} | {inst['rounds']} | "
            f"{', '.join(map(str, inst['declined_rounds'])) or '-'} |"
        )
    for rnd, names in report["declined"].items():
        for name, reason in names.items():
            lines.append(f"\n- Round {rnd}: {m.Refusal(name, m.Reason(reason)).sentence}.")
    for rnd, names in report["dropped"].items():
        for name, what in names.items():
            lines.append(f"\n- Round {rnd}: {name} dropped out ({what}); its ledger counts whatever it released "
                         "for the round, aggregated or not.")
    for rnd, names in report.get("rejected", {}).items():
        for who, code in names.items():
            what = "the round's aggregate" if who == AGGREGATE else f"{who}'s update"
            lines.append(f"\n- Round {rnd}: the coordinator rejected {what} ({code}: "
                         f"{SENTENCES.get(code, 'see server/update_checks.py')}); "
                         + ("the global model stayed as it was." if who == AGGREGATE else
                            "it was left out of the average; its ledger counts the release."))
    for voided in report.get("voided", []):
        lines.append(f"\n- {voided_line(voided)}")
    for lost in report.get("lost_rounds", []):
        lines.append(f"\n- {lost_line(lost)}")
    lines += ["", "## What left each institution", ""]
    lines += [f"- {item['what']}: " + ("covered by its epsilon." if item["covered_by_epsilon"] else
                                       "not covered by epsilon.") for item in report["what_left_each_institution"]]
    lines += ["- Nothing else: no record, no column name of its file, no path, no training loss, no error text."]
    return "\n".join(lines) + "\n"


def lost_line(lost: dict) -> str:
    """One round lost in a coordinator crash, for privacy.md: who released or was asked for it, and whether the
    resumed job trained it again or its institutions, their grant spent on the lost release, declined."""
    released = lost["released_steps"]
    unknown = [name for name in lost.get("asked", []) if name not in released]
    who = [f"released by {' and '.join(f'{name} ({steps} DP-SGD steps)' for name, steps in released.items())}"
           ] if released else []
    if unknown:
        who.append(f"asked of {' and '.join(unknown)} (what they released for it, reported by no later update, "
                   "is in their ledgers)")
    line = (f"Round {lost['round']}: {'; '.join(who) or 'asked of no institution yet'}, lost in the coordinator crash; "
            f"the job resumed from the checkpoint of round {lost['round'] - 1}. Every ledger counts what was released "
            "for it, and the epsilon figures above include what the institutions reported.")
    spent = [name for name, reason in lost.get("declined_retry", {}).items() if reason == m.Reason.BUDGET_SPENT]
    if spent:
        line += (f" Retried after the resume, it was declined by {' and '.join(spent)}: no budget remained in "
                 "their grant to train it again (the noise plan they keep for the job had charged the lost release)")
        line += "." if lost.get("retrained_by") else (
            f", so the round stays lost and the global model after it is the one of round {lost['round'] - 1}"
            + (" (it was the job's last round: the job ended with that model)." if lost.get("last") else "."))
    return line


def voided_line(voided: dict) -> str:
    """One voided round, for privacy.md: who released what for it, that it bought nothing, and that it stays spent."""
    spent = [f"{name} ({row['steps']} DP-SGD steps; its job epsilon rose from {row.get('epsilon_before', 0.0):.4f} "
             f"to {row['epsilon_after']:.4f} with it)" for name, row in voided["spent"].items()]
    later = voided.get("released_steps", {})
    spent += [f"{name} ({steps} DP-SGD steps before it dropped out, as its next update reported)"
              for name, steps in later.items() if steps]
    nothing = [name for name, steps in later.items() if not steps]
    unknown = [name for name in voided["dropped"] if name not in later]
    why = f" after {', '.join(voided['dropped'])} dropped out" if voided["dropped"] else ""
    line = (f"Round {voided['round']}: voided{why}: the round was not aggregated (with SecAgg+, too few institutions "
            f"were left to unmask the sum) and the global model stayed as it was; "
            + (f"released by {' and '.join(spent)}: it bought nothing, and every ledger counts what was released "
               "for it" if spent else "nothing released for it was reported"))
    if nothing:
        line += f"; {' and '.join(nothing)} released nothing for it (the step count of its next update shows)"
    if unknown:
        line += (f"; {' and '.join(unknown)} reported no release for it (whatever it released before dropping out "
                 "is in its ledger)")
    return line + "."


def render_markdown(metrics: dict) -> str:
    cfg = metrics["config"]
    privacy = cfg["privacy"]
    lines = [
        "# fedtune run report",
        "",
        f"- Model: `{metrics.get('model_path', cfg['model']['path'])}`, LoRA rank {cfg['model']['lora_rank']} on the "
        f"top {cfg['model']['trainable_layers']} layers; {metrics.get('trainable_parameters', '?')} trainable parameters travel.",
        *data_lines(metrics),
        f"- Privacy: record-level DP-SGD on every institution (Opacus: Poisson sampling, per-record clipping at "
        f"{privacy['max_grad_norm']}, Gaussian noise). The job asked each institution for epsilon "
        f"{privacy['target_epsilon']}; each institution granted at most what its own budget had left, at its own "
        "delta and accountant. Every epsilon "
        "below is the institution's accountant over its whole released history (all rounds, all local steps, the "
        "real sampling rate), at the delta shown.",
        f"- Secure aggregation: {'on (SecAgg+)' if metrics['secure_aggregation'] else 'off'}. "
        f"{institution_dp_line(metrics['institution_dp'])}",
        f"- Wall time: {metrics.get('wall_seconds', 0):.1f} s.",
        *session_lines(metrics),
        "",
        "## Rounds",
        "",
        "| round | accuracy | loss | took part / asked | bytes up | bytes down |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in metrics["rounds"]:
        loss = f"{r['loss']:.4f}" + (f" (perplexity {r['perplexity']:.2f})" if "perplexity" in r else "")
        lines.append(f"| {r['round']} | {r['accuracy']:.4f} | {loss} | {len(r.get('took_part', []))} / "
                     f"{len(r.get('asked', []))} | {r['bytes_up']:,} | {r['bytes_down']:,} |")
    lines += [
        "",
        "## Institutions",
        "",
        "| institution | records (rounded) | epsilon granted / this job | data set epsilon / budget | delta | accountant | noise multiplier "
        "| sample rate | clip norm | steps | rounds (declined) | bytes up | bytes down |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for inst in metrics["institutions"]:
        lines.append(
            f"| {inst['name']} | {cell(inst['examples'])} | {cell(inst['granted_epsilon'], '.3f')} / {inst['epsilon']:.3f} | "
            f"{cell(inst['dataset_epsilon'], '.3f')} / "
            f"{cell(inst['budget_epsilon'], 'g')} | {cell(inst['delta'], 'g')} | {cell(inst['accountant'])} | "
            f"{cell(inst['noise_multiplier'], '.4f')} | {cell(inst['sample_rate'], '.4f')} | {cell(inst['max_grad_norm'], 'g')} | "
            f"{inst['steps']} | {inst['rounds']} ({len(inst['declined_rounds'])}) | {inst['bytes_up']:,} | {inst['bytes_down']:,} |"
        )
    lines += sample_lines(metrics.get("samples", []))
    lines += ["", "![accuracy](accuracy.png)", "", "![epsilon](epsilon.png)", ""]
    return "\n".join(lines)


def sample_lines(samples: list[dict]) -> list[str]:
    """A causal LM's greedy generations for the first test prompts (the coordinator's own test file)."""
    if not samples:
        return []

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["", "## Sample generations (final model, greedy)", "", "| prompt | expected | generated |", "|---|---|---|"]
    return lines + [f"| {cell(s['prompt'])} | {cell(s['expected'])} | {cell(s['generated'])} |" for s in samples]


def data_lines(metrics: dict) -> list[str]:
    """A simulation's data is one file split by Dirichlet; a deployed job's is what the coordinator knows: the
    institutions and the record counts they reported."""
    cfg = metrics["config"]
    fed = cfg["federation"]
    if not metrics.get("deployed"):
        return [f"- Data: `{cfg['data']['train_path']}`; test `{cfg['data']['test_path']}`.",
                f"- Federation: {fed['institutions']} institutions, {fed['rounds']} rounds, strategy {fed['strategy']}, "
                f"Dirichlet alpha {fed['alpha']}."]
    counts = ", ".join(f"{inst['name']} {cell(inst['examples'])}" for inst in metrics["institutions"])
    return [f"- Data: each institution's own file, which the coordinator never sees; records as the institutions "
            f"reported them (rounded up to {m.RECORD_GRANULARITY}s): {counts or 'none reported'}. The coordinator "
            f"evaluated on its own test file `{cfg['data']['test_path']}`.",
            f"- Federation: {fed['institutions']} institutions, {fed['rounds']} rounds, strategy {fed['strategy']}."]


def session_lines(metrics: dict) -> list[str]:
    """The job's identity and, for a job its coordinator lost, where it was interrupted and resumed."""
    sessions = metrics.get("sessions", [])
    lines = [f"- Job id: {metrics.get('job_id') or '-'}."] if metrics.get("job_id") else []
    for session in sessions[1:]:
        lines.append(f"- Interrupted (coordinator crash) after the checkpoint of round {session['after_round']}; "
                     f"resumed {session['started']} as Flower run {session['run_id']}.")
    return lines


def _plot_accuracy(path: Path, metrics: dict) -> None:
    rounds = [r["round"] for r in metrics["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["accuracy"] for r in metrics["rounds"]], marker="o")
    ax.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_epsilon(path: Path, metrics: dict) -> None:
    """Privacy burn-down: epsilon spent per institution per round, against its budget."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for inst in metrics["institutions"]:
        points = sorted((int(k), v) for k, v in inst["dataset_epsilon_per_round"].items())
        ax.plot([0] + [p[0] for p in points], [0.0] + [p[1] for p in points], marker="o", label=inst["name"])
    for budget in sorted({inst["budget_epsilon"] for inst in metrics["institutions"]} - {None}):
        ax.axhline(budget, color="red", linestyle="--", label=f"budget ε={budget:g}")
    ax.set(xlabel="round", ylabel="epsilon spent on the data set", title="Privacy budget burn-down")
    if metrics["institutions"]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

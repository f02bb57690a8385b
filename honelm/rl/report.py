"""PPO's and GRPO's part of the run report: the rollouts and the update statistics, from the run's events."""

from __future__ import annotations

from pathlib import Path

from honelm.reporting import RunData, fmt, plot_val_metrics, series, table

# What a PPO run's `rollout` events (one per sampled batch) and its `train` events carry, in panel order.
ROLLOUT_KEYS = ("score", "rlhf_reward", "kl", "response_length", "ended", "time_s")
PPO_TRAIN_KEYS = ("pg_loss", "vf_loss", "entropy", "clipfrac", "vf_clipfrac", "approx_kl")


def _rl_section(data: RunData, plots: Path, written: set[str], label: str, keys: tuple[tuple[str, ...], tuple[str, ...]],
                rollout_title: str, update_title: str, intro: str) -> list[str]:
    """An RL run's rollout panel and update panel (LABEL.png, lower case) with a first/last table; nothing without
    rollouts."""
    rollout_keys, train_keys = keys
    rollouts = {k: pts for k in rollout_keys if (pts := series(data.events, "rollout", k))}
    if not rollouts:
        return []
    plot_val_metrics(plots / "rollouts.png", rollouts, rollout_title)
    written.add("rollouts.png")
    updates = {k: pts for k in train_keys if (pts := series(data.events, "train", k))}
    updates_png = f"{label.lower()}.png"
    if updates:
        plot_val_metrics(plots / updates_png, updates, update_title)
        written.add(updates_png)
    lines = [f"## {label} rollouts", "", intro, "", f"![{label} rollouts](plots/rollouts.png)", ""]
    if updates:
        lines += [f"![{label} updates](plots/{updates_png})", ""]
    rows = [[k, fmt(pts[0][1]), fmt(pts[-1][1]), pts[-1][0]] for k, pts in {**rollouts, **updates}.items()]
    return [*lines, *table(["statistic", "first", "last", "last step"], rows), ""]


def rollouts_section(data: RunData, plots: Path, written: set[str]) -> list[str]:
    """PPO's rollout and update panels with a first/last table; nothing for a run without rollout events."""
    return _rl_section(data, plots, written, "PPO", (ROLLOUT_KEYS, PPO_TRAIN_KEYS),
                       "PPO rollouts vs step (per-sequence means)", "PPO updates vs step (per response token)",
                       "Each rollout samples responses at the training temperature; `score` is the reward model's, "
                       "`kl` the summed per-token KL to the reference, `rlhf_reward` = score − kl_coef·kl, `ended` the "
                       "fraction of responses that emitted EOS.")


# What a GRPO run's `rollout` events (one per group rollout) and its `train` events carry, in panel order
# (metric names; one is spelled like a stage, hence one string).
GROUP_KEYS = tuple("reward accuracy reward_std zero_std_groups response_length ended".split())
GRPO_TRAIN_KEYS = ("pg_loss", "entropy", "clipfrac", "kl", "ratio")


def groups_section(data: RunData, plots: Path, written: set[str]) -> list[str]:
    """GRPO's rollout and update panels (the reward curve) with a first/last table; nothing without rollouts."""
    return _rl_section(data, plots, written, "GRPO", (GROUP_KEYS, GRPO_TRAIN_KEYS),
                       "GRPO rollouts vs step (means over sampled responses)", "GRPO updates vs step",
                       "Each rollout samples a group of responses per prompt at the training temperature; `reward` is "
                       "their mean reward, `accuracy` the share every reference check accepted, `zero_std_groups` the "
                       "share of groups whose rewards were all equal (no signal).")

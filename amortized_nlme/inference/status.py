"""The result status of a fit: ``ok``, ``warning`` or ``unreliable``, with every reason, so that a fit the tool
cannot vouch for says so (in the printed summary, ``summary.json`` and at the top of ``report.md``; ``--strict``
turns anything but ok into exit code 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

LEVELS = ("ok", "warning", "unreliable")
#: share of individuals with unreliable importance weights above which the whole fit is unreliable
UNRELIABLE_SHARE = 0.1
#: Monte-Carlo error (RMS, in statistical SEs) above which the estimates are unreliable
UNRELIABLE_MC = 1.0


@dataclass
class Status:
    level: str = "ok"
    reasons: list[str] = field(default_factory=list)

    def add(self, level: str, reason: str) -> None:
        if LEVELS.index(level) > LEVELS.index(self.level):
            self.level = level
        self.reasons.append(f"[{level}] {reason}")

    def to_dict(self) -> dict:
        return {"status": self.level, "reasons": list(self.reasons)}

    def lines(self) -> list[str]:
        head = f"status: {self.level.upper()}"
        return [head] + [f"  - {r}" for r in self.reasons] if self.reasons else [head + " (no warnings)"]


def assess(*, likelihood: str, has_likelihood: bool, n_individuals: int, proposal: dict | None,
           support: dict | None, at_bound: list[str], mc_ratio: float | None, mc_target: float,
           kernel_parameters: list[str], se_undefined: list[str] = (), model_warnings: list[str] = ()) -> Status:
    """Collect every reason not to trust the fit as it stands."""
    st = Status()
    if likelihood == "amortized":
        if has_likelihood:
            st.add("warning", "amortized objective (weights 1/p(phi)) on request: it is exact only if the estimator "
                              "is the exact posterior; rerun with --likelihood exact (the default) to check")
        else:
            st.add("warning", "the model has no tractable likelihood (SDE): the amortized objective is only as good "
                              "as the estimator, whose calibration check is in its meta.json")
    if proposal is not None:
        bad = proposal["n_khat_above_0.7"]
        if bad:
            level = "unreliable" if bad > UNRELIABLE_SHARE * n_individuals else "warning"
            st.add(level, f"{bad} of {n_individuals} individuals have Pareto k̂ > 0.7 after proposal refinement "
                          "(their likelihood estimates are unreliable; listed under proposal_diagnostics)")
    if support is not None and support["n_outside"]:
        st.add("warning", f"{support['n_outside']} individuals are unlike the estimator's training simulations "
                          f"(design: {support['n_design_outside']}, summary space: {support['n_summary_outside']}; "
                          "listed under support)")
    if at_bound:
        st.add("warning", f"estimates at an optimisation bound: {', '.join(at_bound)} (a variance collapsing to 0 "
                          "or a parameter the data do not identify)")
    if se_undefined:
        st.add("warning", f"no standard error for {', '.join(se_undefined)} (the Hessian is not positive definite "
                          "there: a flat or non-identified direction); use the profile intervals")
    if mc_ratio is not None and mc_ratio > mc_target:
        level = "unreliable" if mc_ratio > UNRELIABLE_MC else "warning"
        st.add(level, f"Monte-Carlo error up to {mc_ratio:.2f} x the statistical SE (target {mc_target:g}); more "
                      "draws (--max-draws) would reduce it")
    for text in model_warnings:
        st.add("warning", text)
    if kernel_parameters:
        st.add("warning", f"parameters without random effect {', '.join(kernel_parameters)} use a narrow Gaussian "
                          "kernel (bias reported under kernel)")
    return st

"""Checks shared by several test files (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""
import pytest


def assert_moments_close(a, b, rel=1e-3):
    """Adam's moments are linear in the gradients (the weights are not: Adam normalises away a wrong scale)."""
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    for k in ("exp_avg", "exp_avg_sq"):
        scale = max(s[k].abs().max().item() for s in sa.values())
        worst = max((sa[i][k] - sb[i][k]).abs().max().item() for i in sa)
        assert worst <= rel * scale, (k, worst, scale)


def interrupted_sampling(args, monkeypatch):
    """sample.main(args) stopped (Ctrl-C) after its first shard."""
    import sample
    generate, calls = sample.generate, []

    def killed_in_second_shard(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return generate(*a, **k)
    monkeypatch.setattr(sample, "generate", killed_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args)
    monkeypatch.setattr(sample, "generate", generate)

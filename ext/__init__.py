"""slightdiff's extensions: leaf modules that import the core and are never imported by it, except through the two
lazy seams (README "Layout"): model.load_model hands what is not a run to released.py, and evaluate.py runs the
commands of its EXTENSIONS table.

  released.py   the paper's released DiTs converted on load (DiT's .pt, diffusers DiTs and pipelines)
  adapters.py   ControlNet and T2I-Adapter on a frozen run: control images, training, sampling, edge F1
  measures.py   the paper's other measures: diversity (RMD, NN L2, TopPR, VQ entropy), classify, CLIP score
  study.py      the reproducibility study (Zhang et al.): repro, memorization
  gmm.py        Chen et al. Sec. 4 simulated on a Gaussian mixture
  plots.py      the eta report: its table, the study's, the figures
  bench.py      throughput of training, sampling and FID features against eager fp32
"""


def run_command(commands, argv, module, doc):
    """python -m ext.MODULE COMMAND [flags]: the command's main on its flags; --help, the module's docstring."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        return print(doc)
    if not argv or argv[0] not in commands:
        raise ValueError(f"give a command: python -m ext.{module} {{{','.join(commands)}}} ... (--help: what each "
                         f"does)" + (f"; {argv[0]!r} is not one" if argv else ""))
    return commands[argv[0]](argv[1:])

"""Layer 5, experiments: runs kept by configuration and the measurements the notebooks report.

``runs`` (a run folder per configuration, trained once and shared), ``configs`` (the notebooks' and ``make
figures``' runs as configurations), ``evaluations`` (drivers that generate images to measure them), ``shipped``
(the shipped ControlNets and their cards), ``bench_runs`` (notebook 10's shipped successor runs), ``costs`` (an
architecture's parameters, file size and times on equal terms) and ``successor_claims`` (published claims and the
verdicts measurements give them).
"""

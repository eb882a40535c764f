"""``qalign compare``: every method on one task, one training-sample budget, one held-out set, one report.

- :mod:`qalign.compare.config`: the YAML, and how the budget sizes each method;
- :mod:`qalign.compare.runner`: train, evaluate and measure each method, resumably;
- :mod:`qalign.compare.stats`: confidence intervals and paired tests over problems;
- :mod:`qalign.compare.kl`: KL to π_ref per token, the same way for every policy;
- :mod:`qalign.compare.report`: report.md/json, frontier.png, curves.png.
"""

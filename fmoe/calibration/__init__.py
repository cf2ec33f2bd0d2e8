"""The calibration pass: one forward (and, for Fisher, one backward) per batch, with accumulators on the experts'
intermediate activations and the layers' outputs.

loss.py is the next-token NLL every pass and recovery share; context.py what every accumulator is told per batch;
criteria.py the dim criteria (Fisher, activation, router, magnitude, random, grad_abs); statistics.py the expert-
and layer-level statistics; gram.py the Gram sums of least-squares refits (and the compensated criterion);
scorer.py the pass that runs any of them together; streamed.py the same pass one decoder layer at a time, from a
checkpoint (models bigger than the machine; boundaries.py what its sweeps keep between layers); scores.py the result and the algebra combining criteria.
"""

"""Side-by-side benchmarks of sam-jax against the official PyTorch SAM.

    python -m bench --model vit_b                       # all cases, the table, bench/results.json
    python -m bench --model tiny --cases encoder,predict --repeats 1 --out /tmp/r.json

Both implementations run in the same process (or in fresh processes of their own for
the memory and compile cases) on the same randomized weights and the same inputs; each
timed case alternates them after a warm-up and reports the median of the repeats, with
a check that the two agree on what was timed. See bench/NOTES.md.
"""

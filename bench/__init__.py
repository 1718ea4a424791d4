"""A rerunnable benchmark: what callahead costs a Postfix backup MX, and how it compares
with Postfix's own ``reject_unverified_recipient``.

Run it with ``./dev bench`` (or ``python -m bench.run`` from the repository root, as
root, in the venv). See ``bench/README.md`` for what is measured and how.

Modules:

- :mod:`bench.smtpclient` -- a small bounded asyncio SMTP client (attack load, latency).
- :mod:`bench.tools` -- smtp-source and smtp-sink as bounded subprocesses, /proc readers.
- :mod:`bench.stack` -- the Postfix backup MX with a listener per case, two Postfix
  primaries, callahead and smtp-sink, all on loopback.
- :mod:`bench.memory` -- resident memory of callahead's positive cache per address, and
  of the client guard per tracked client.
- :mod:`bench.trivial_milter` -- a milter that only says CONTINUE: pymilter's floor.
- :mod:`bench.plan` -- the settings (command line) and which addresses each run uses.
- :mod:`bench.phases` -- the workloads (warm, cold, attack, latency, memory).
- :mod:`bench.report` -- what was measured, one ``Report`` per benchmark.
- :mod:`bench.render` -- the Markdown report.
- :mod:`bench.run` -- ``main``: the stack, the phases in turn, the report written.
- :mod:`bench.shape` -- on its own (not in ``./dev bench``): what one recipient per
  transaction costs a default Postfix primary (``bench/RESULTS-shape.md``).
- :mod:`bench.backscatter` -- on its own: how much backscatter callahead prevents and
  lets through, by reason, through a real backup with the meter on, beside plain
  Postfix (``bench/RESULTS-backscatter.md``).
- :mod:`bench.coldpath` -- on its own: callahead's CPU per cold recipient through each
  front end, and its py-spy profile (:mod:`bench.profilesummary`; ``RESULTS-coldpath.md``);
  :mod:`bench.coldsteps` the CPU of single steps of it, in process.
"""

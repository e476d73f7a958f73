"""The experiment's stages, in pipeline order: data -> align -> attack -> realign -> evaluate -> report.

Each module holds orchestration only (load, call the library, save); :mod:`nlsr.experiment.plan` wires
them into a :class:`nlsr.experiment.pipeline.Stage` graph from the config.
"""

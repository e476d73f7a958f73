"""A small subset of the offline data sets, shipped with the package so that ``nlsr run
configs/smoke.yaml`` works on a fresh clone (see README.md here; made by :mod:`.make_bundle`)."""

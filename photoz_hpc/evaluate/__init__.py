"""What a trained network says about galaxies: metrics runs, catalogues, calibration, embeddings.

``run`` (the evaluate command), ``inputs`` (what every command checks first: the data's bands are the network's),
``pdfs`` (point estimates and intervals from binned probabilities on the network's redshift grid),
``predictions`` / ``plots`` (evaluation CSV and figures), ``catalogue`` (survey-scale predict),
``calibration`` (PIT, coverage, temperature), ``qp_export`` (RAIL), ``embeddings`` / ``similarity``
(embed, search, anomalies), ``ids`` (how every output names galaxies: the store's own id column, SDSS ``ObjID``
or Multimodal Universe ``object_id``, int64 or string, exactly), ``arrays`` (pdfs and embeddings of cutouts held in
memory, for the Python API: the commands' own per-batch code and checks). The metrics themselves live in
``photoz_hpc.metrics``; sweeps and their report (the paper's Figure 2) in ``photoz_hpc.launch``.
"""

"""What training and serving share: the model.json schema, networks, artifacts, preprocessing.

``wastenet.schema`` and ``wastenet.classes`` import no torch; the rest does.
"""

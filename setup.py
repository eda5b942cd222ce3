"""Package of the e-commerce retrieval pipeline (installed into the venv and the pipeline image)."""

import setuptools

setuptools.setup(
    name='ecommerce-recommender-tfx',
    version='0.1.0',
    description='TFX pipeline: interaction log + catalog -> gated two-tower model on TF Serving',
    # The layers, bottom up (docs/architecture.md): contract, servable, trainers, compression,
    # evaluation, components, runners, serving; configs and pipeline on top.
    packages=setuptools.find_packages(include=[
        'contract', 'servable', 'trainers', 'compression', 'compression.*', 'evaluation',
        'components', 'runners', 'serving', 'serving.*']),
    py_modules=['configs', 'pipeline'],
    python_requires='>=3.10,<3.11',
)

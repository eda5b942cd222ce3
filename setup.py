"""Package of the e-commerce retrieval pipeline (installed into the venv and the pipeline image)."""

import setuptools

setuptools.setup(
    name='ecommerce-recommender-tfx',
    version='0.1.0',
    description='TFX pipeline: interaction log + catalog -> gated two-tower model on TF Serving',
    packages=setuptools.find_packages(include=['components', 'trainers', 'compression', 'compression.*', 'serving', 'serving.*']),
    py_modules=['pipeline'],
    python_requires='>=3.10,<3.11',
)

"""TextEncoder: the TFX component that writes a pretrained BERT as a TF Hub SavedModel.

Its Model artifact is the Transform's and the Trainer's `base_model`; the conversion itself
(a Hugging Face checkpoint or a TF Hub handle in, a TF Hub SavedModel out) is
trainers/text_encoder.py's `build_encoder_savedmodel`.
"""

from tfx import v1 as tfx

from trainers import text_encoder as encoder_lib


@tfx.dsl.components.component
def TextEncoder(  # pylint: disable=invalid-name
    model: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.Model],
    checkpoint_dir: tfx.dsl.components.Parameter[str] = '',
    tfhub_handle: tfx.dsl.components.Parameter[str] = '',
    code_fingerprint: tfx.dsl.components.Parameter[str] = ''):
  """Writes a BERT encoder as a TF Hub SavedModel at `model.uri`.

  Args:
    model: the output; the SavedModel is at encoder_lib.saved_model_dir(uri), the vocab in its
      assets/vocab.txt.
    checkpoint_dir: a Hugging Face BERT checkpoint directory (config.json, vocab.txt,
      model.safetensors); empty for the installed all-MiniLM-L6-v2.
    tfhub_handle: a TF Hub handle or SavedModel path to use instead of a checkpoint.
    code_fingerprint: the pipeline's code fingerprint; only part of the cache key.
  """
  del code_fingerprint
  info = encoder_lib.build_encoder_savedmodel(encoder_lib.saved_model_dir(model.uri),
                                              checkpoint_dir or None, tfhub_handle or None)
  for key, value in info.items():
    if isinstance(value, int):
      model.set_int_custom_property(key, value)
    else:
      model.set_string_custom_property(key, value)

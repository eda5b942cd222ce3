"""Feature names and sizes shared by ExampleGen, Transform, Trainer, Evaluator and serving."""

# Raw tf.Example features written by components.example_gen.
USER_ID = 'user_id'
ITEM_ID = 'item_id'          # the target item of the example
HISTORY = 'history'          # previous distinct items, most recent last
QUERY = 'query'              # search text that led to the target event ('' for none)
TIMESTAMP = 'timestamp'      # unix seconds of the target event

# Splits (GUIDE §3): 'eval' holds the validation targets, 'test' the test targets.
TRAIN_SPLIT = 'train'
EVAL_SPLIT = 'eval'
TEST_SPLIT = 'test'
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT, TEST_SPLIT)

# Train examples keep this many history items; eval and test keep the whole history, because
# it is also the set of items excluded from ranking.
MAX_TRAIN_HISTORY = 50

# Transform outputs.
USER_IDX = 'user_idx'
ITEM_IDX = 'item_idx'
HISTORY_IDX = 'history_idx'
USER_VOCAB = 'user_id_vocab'
ITEM_VOCAB = 'item_id_vocab'

# Serving contract (GUIDE §5).
MODEL_NAME = 'recommender'
EVAL_SIGNATURE = 'eval_ranks'
RANK_OUTPUT = 'rank'

"""Feature names and sizes shared by ExampleGen, Transform, Trainer, Evaluator and serving."""

# Raw tf.Example features written by components.example_gen.
USER_ID = 'user_id'
ITEM_ID = 'item_id'          # the target item of the example
HISTORY = 'history'          # previous distinct items, most recent last
QUERY = 'query'              # search text that led to the target event ('' for none)
TIMESTAMP = 'timestamp'      # unix seconds of the target event
ITEM_TEXT = 'item_text'      # catalog examples: the item's title, description, category, brand

# Slicing features (the Evaluator's slices): activity of the example's user (history length),
# training popularity of the target, and whether the target is cold (no fit interactions).
USER_ACTIVITY = 'user_activity_bucket'
ITEM_POPULARITY = 'item_popularity_bucket'
COLD_START = 'cold_start_item'
SLICE_FEATURES = (USER_ACTIVITY, ITEM_POPULARITY, COLD_START)

# Splits (docs/contracts.md §2): 'eval' holds the validation targets, 'test' the test targets.
TRAIN_SPLIT = 'train'
EVAL_SPLIT = 'eval'
TEST_SPLIT = 'test'
# One example per catalog item (item_id, item_text; no user): the items the text tower encodes.
CATALOG_SPLIT = 'catalog'
# The test targets again, as search requests: no user, no history, a query from the target's
# title (contract.protocol.search_query).
SEARCH_SPLIT = 'search'
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT, TEST_SPLIT, CATALOG_SPLIT, SEARCH_SPLIT)

# Train examples keep this many history items; eval and test keep the whole history, because
# it is also the set of items excluded from ranking.
MAX_TRAIN_HISTORY = 50

# Transform outputs.
USER_IDX = 'user_idx'
ITEM_IDX = 'item_idx'
HISTORY_IDX = 'history_idx'
QUERY_TOKENS = 'query_tokens'        # WordPiece ids of the query, [B, (T)]
ITEM_TEXT_TOKENS = 'item_text_tokens'  # WordPiece ids of the item text, [B, (T)]
USER_VOCAB = 'user_id_vocab'
ITEM_VOCAB = 'item_id_vocab'

# Serving contract (docs/contracts.md §4).
# Beside Format-Serving in the Trainer's Model artifact: what rebuilding the Keras model takes
# (trainers/model.py writes it; the Compressor and the run summary read it); training.json in
# it holds the hyperparameters, vocabulary sizes and the per-epoch history.
TRAINER_STATE_DIR = 'trainer_state'
TRAINING_STATE_FILE = 'training.json'

MODEL_NAME = 'recommender'
EVAL_SIGNATURE = 'eval_ranks'
RANK_OUTPUT = 'rank'
# eval_ranks' second output: serving_default's share of the exact top-INDEX_RECALL_K.
INDEX_RECALL_OUTPUT = 'index_recall'
INDEX_RECALL_K = 10

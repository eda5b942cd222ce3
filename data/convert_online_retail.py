"""Convert the raw UCI Online Retail CSV into the project's data contract.

Writes ``interactions.csv`` (user_id,item_id,timestamp,event_type,quantity,query)
and ``items.csv`` (item_id,title,description,category,brand,price) into an
output directory. Only purchases are kept: rows with a CustomerID, Quantity > 0
and an InvoiceNo that does not start with "C". The original row order is kept,
because it decides ties between equal timestamps downstream.

Example:
    python data/convert_online_retail.py \\
        --input ../shared/data/online_retail/online_retail.csv.gz \\
        --output /tmp/online_retail_full
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity",
                    "InvoiceDate", "UnitPrice", "CustomerID"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "event_type", "quantity", "query"]
ITEM_COLUMNS = ["item_id", "title", "description", "category", "brand", "price"]


class ConversionError(Exception):
    """A problem with the input that is reported as a one-line error."""


def load_purchases(path):
    """Reads the raw file and keeps purchase rows in file order.

    Args:
        path: Path to the raw CSV (plain or gzip-compressed).

    Returns:
        A DataFrame with columns user_id, item_id, timestamp, quantity, title, price.

    Raises:
        ConversionError: If the file is missing, unreadable or lacks a required column.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"input file not found: {path}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ConversionError(f"{path} lacks required column(s): {', '.join(missing)}")

    raw = raw.apply(lambda col: col.str.strip())
    try:
        quantity = pd.to_numeric(raw["Quantity"]).astype("int64")
        keep = (raw["CustomerID"] != "") & (quantity > 0) & ~raw["InvoiceNo"].str.startswith("C")
        rows = raw[keep]
        dates = rows["InvoiceDate"]
        try:
            when = pd.to_datetime(dates, format="%Y-%m-%d %H:%M:%S")
        except ValueError:
            when = pd.to_datetime(dates)
        return pd.DataFrame({
            # "17850.0" and "17850" both become "17850".
            "user_id": pd.to_numeric(rows["CustomerID"]).astype("int64").astype(str),
            "item_id": rows["StockCode"],
            "timestamp": when.values.astype("datetime64[s]").astype("int64"),
            "quantity": quantity[keep],
            "title": rows["Description"],
            "price": pd.to_numeric(rows["UnitPrice"]),
        }).reset_index(drop=True)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"malformed value in {path}: {exc}") from None


def sample_users(purchases, n, seed):
    """Keeps the purchases of n customers drawn uniformly without replacement.

    Args:
        purchases: Output of load_purchases.
        n: Number of customers to keep (all of them if n is at least their count).
        seed: Seed for numpy's default_rng.

    Returns:
        The purchases of the sampled customers, in original row order.
    """
    users = np.sort(purchases["user_id"].unique())
    if n < len(users):
        users = np.random.default_rng(seed).choice(users, size=n, replace=False)
    return purchases[purchases["user_id"].isin(users)].reset_index(drop=True)


def build_items(purchases):
    """Builds one catalog row per item_id, sorted by item_id.

    The title is the most frequent non-empty Description (ties: first seen) and
    the price the median UnitPrice, rounded to 2 decimals.

    Args:
        purchases: Purchase rows as returned by load_purchases.

    Returns:
        A DataFrame with the ITEM_COLUMNS columns.
    """
    named = purchases[purchases["title"] != ""].reset_index()
    counts = named.groupby(["item_id", "title"]).agg(n=("index", "size"), first=("index", "min"))
    titles = (counts.reset_index()
              .sort_values(["item_id", "n", "first"], ascending=[True, False, True])
              .drop_duplicates("item_id").set_index("item_id")["title"])
    items = purchases.groupby("item_id")["price"].median().round(2).to_frame()
    items["title"] = titles.reindex(items.index).fillna("")
    for col in ("description", "category", "brand"):
        items[col] = ""
    return items.reset_index().sort_values("item_id")[ITEM_COLUMNS]


def write_atomically(frame, path):
    """Writes a DataFrame as CSV via a temporary file and os.replace.

    Args:
        frame: The DataFrame to write (without its index).
        path: Destination file path.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            frame.to_csv(f, index=False, float_format="%.2f")
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    """Runs the command line interface.

    Args:
        argv: Arguments (defaults to sys.argv[1:]).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True,
                        help="raw Online Retail CSV (.csv or .csv.gz), e.g. "
                             "../shared/data/online_retail/online_retail.csv.gz")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory for interactions.csv and items.csv")
    parser.add_argument("--sample-users", type=int, metavar="N",
                        help="keep a random sample of N customers")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = parser.parse_args(argv)
    if args.sample_users is not None and args.sample_users <= 0:
        parser.error("--sample-users must be positive")

    try:
        purchases = load_purchases(args.input)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.sample_users is not None:
        purchases = sample_users(purchases, args.sample_users, args.seed)

    interactions = purchases.assign(event_type="purchase", query="")[INTERACTION_COLUMNS]
    items = build_items(purchases)
    os.makedirs(args.output, exist_ok=True)
    write_atomically(interactions, os.path.join(args.output, "interactions.csv"))
    write_atomically(items, os.path.join(args.output, "items.csv"))
    print(f"users={interactions['user_id'].nunique()} items={len(items)} "
          f"interactions={len(interactions)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

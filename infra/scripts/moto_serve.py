"""moto's server with DynamoDB requests isolated from each other, as the local stack of the tests.

moto applies a TransactWriteItems request item by item and undoes a cancelled one by putting
back a copy of the whole table taken before it began. Its server handles requests on concurrent
threads, so another request can see a transaction half applied, and the undo can erase a write
that another request made meanwhile. DynamoDB isolates transactions; relink relies on that (a
stage starts and ends with one transaction that writes the run and moves the lock). So here:

- every DynamoDB backend call holds one lock (SQS and Secrets Manager are untouched: a long poll
  must not hold up the table);
- a transaction checks every condition first and writes only when all hold, so it never needs
  an undo, and never copies the table (the copy made each transaction cost time proportional
  to everything the table holds).

Written against moto 5.2.5 (pinned by local-aws.sh).
Usage: python moto_serve.py -H 127.0.0.1 -p PORT (the arguments of moto_server).
"""

import functools
import inspect
import sys
import threading

from moto.dynamodb.comparisons import get_filter_expression
from moto.dynamodb.exceptions import (
    MultipleTransactionsException,
    TooManyTransactionsException,
    TransactionCanceledException,
    TransactWriteSingleOpException,
)
from moto.dynamodb.models import DynamoDBBackend

_LOCK = threading.RLock()


def _transact_write_items(self, transact_items):
    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    seen = set()
    errors = []
    ops = []
    for item in transact_items:
        if len(item) > 1:
            raise TransactWriteSingleOpException()
        op_type, op = next(iter(item.items()))
        if op_type not in {"ConditionCheck", "Put", "Delete", "Update"}:
            raise ValueError("Unsupported transaction operation")
        table = self.get_table(op["TableName"])
        if op_type == "Put":
            attrs = op["Item"]
            key = {table.hash_key_attr: attrs[table.hash_key_attr]}
            if table.range_key_attr is not None:
                key[table.range_key_attr] = attrs[table.range_key_attr]
        else:
            key = op["Key"]
        unique = (op["TableName"], str(dict(sorted(key.items()))))
        if unique in seen:
            raise MultipleTransactionsException()
        seen.add(unique)
        current = self.get_item(op["TableName"], key)
        condition = op.get("ConditionExpression")
        if condition is not None and not get_filter_expression(
            condition,
            op.get("ExpressionAttributeNames"),
            op.get("ExpressionAttributeValues"),
        ).expr(current):
            old = None
            if op.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD" and current:
                old = current.to_json()["Attributes"]
            errors.append(("ConditionalCheckFailed", "The conditional request failed", old))
        else:
            errors.append((None, None, None))
        ops.append((op_type, op, key))
    if any(code is not None for code, _, _ in errors):
        raise TransactionCanceledException(errors)
    for op_type, op, key in ops:
        names = op.get("ExpressionAttributeNames")
        values = op.get("ExpressionAttributeValues")
        condition = op.get("ConditionExpression")
        if op_type == "Put":
            self.put_item(
                op["TableName"],
                op["Item"],
                condition_expression=condition,
                expression_attribute_names=names,
                expression_attribute_values=values,
            )
        elif op_type == "Delete":
            self.delete_item(
                op["TableName"],
                key,
                condition_expression=condition,
                expression_attribute_names=names,
                expression_attribute_values=values,
            )
        elif op_type == "Update":
            self.update_item(
                op["TableName"],
                key,
                update_expression=op["UpdateExpression"],
                condition_expression=condition,
                expression_attribute_names=names,
                expression_attribute_values=values,
            )


DynamoDBBackend.transact_write_items = _transact_write_items


def _serialised(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        with _LOCK:
            return method(*args, **kwargs)

    return call


for _cls in DynamoDBBackend.__mro__:
    if _cls is object or not _cls.__module__.startswith("moto.dynamodb"):
        continue
    for _name, _member in list(vars(_cls).items()):
        if _name.startswith("__") or not inspect.isfunction(_member):
            continue
        if getattr(DynamoDBBackend, _name) is _member:
            setattr(DynamoDBBackend, _name, _serialised(_member))

from moto.server import main  # noqa: E402  (after the patch, which it must see)

sys.exit(main())

"""A small IAM policy evaluator for tests: is an S3 call the job made allowed by a printed policy?

It covers what brainseg's policies use: Allow statements, wildcard actions and resources, and the
condition operators StringEquals, StringLike, ArnLike and Bool (a missing context key fails the
condition, as in IAM). Calls are recorded from botocore's events.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

OBJECT_ACTIONS = {"GetObject": "s3:GetObject", "HeadObject": "s3:GetObject", "PutObject": "s3:PutObject",
                  "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
                  "CompleteMultipartUpload": "s3:PutObject", "AbortMultipartUpload": "s3:AbortMultipartUpload",
                  "DeleteObject": "s3:DeleteObject"}
BUCKET_ACTIONS = {"ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "HeadBucket": "s3:ListBucket"}


def request(operation: str, params: dict, account: str) -> tuple[str, str, dict]:
    """``(action, resource ARN, condition context)`` of one S3 API call."""
    context = {"s3:ResourceAccount": account}
    if operation in OBJECT_ACTIONS:
        return OBJECT_ACTIONS[operation], f"arn:aws:s3:::{params['Bucket']}/{params['Key']}", context
    if "Prefix" in params:
        context["s3:prefix"] = params["Prefix"]
    return BUCKET_ACTIONS[operation], f"arn:aws:s3:::{params['Bucket']}", context


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict, context: dict) -> bool:
    for operator, pairs in condition.items():
        for key, wanted in pairs.items():
            if key not in context:
                return False
            value = str(context[key])
            if operator in ("StringLike", "ArnLike"):
                matched = any(fnmatchcase(value, pattern) for pattern in _listed(wanted))
            elif operator in ("StringEquals", "Bool"):
                matched = value in [str(v) for v in _listed(wanted)]
            else:
                raise ValueError(f"condition operator {operator} is not modelled")
            if not matched:
                return False
    return True


def allowed(policy: dict, action: str, resource: str, context: dict) -> bool:
    return any(statement["Effect"] == "Allow"
               and any(fnmatchcase(action, pattern) for pattern in _listed(statement["Action"]))
               and any(fnmatchcase(resource, pattern) for pattern in _listed(statement["Resource"]))
               and _condition_holds(statement.get("Condition", {}), context)
               for statement in policy["Statement"])


class S3Calls:
    """Records every S3 call of a boto3 client (operation and parameters) while registered."""

    def __init__(self, client):
        self.client = client
        self.calls: list[tuple[str, dict]] = []

    def _record(self, params, model, **_):
        self.calls.append((model.name, dict(params)))

    def __enter__(self) -> S3Calls:
        self.client.meta.events.register("before-parameter-build.s3", self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister("before-parameter-build.s3", self._record)

"""The IAM policies a brainseg training job needs: least privilege, and none that can hurt the data.

Three documents (``brainseg-launch iam-policy``):

* the job role's permissions: list and read the dataset; write only its header index and identity
  key (``.brainseg/``, ``--index-uri``, or the key apart at ``--identity-key-uri``); read and write the output prefix, delete only checkpoints
  of this job's runs (pruning); for a prediction job (``--model``), read the models (and a
  cross-validation's ``-cv.json`` that ``--hp postprocessing`` names) and delete only
  the prediction output's completion markers; every S3 statement pinned to the buckets' account
  (``s3:ResourceAccount``), KMS keys usable only through S3 and SageMaker's EBS volumes; ECR,
  CloudWatch logs and metrics; VPC network interfaces when asked for;
* the role's trust policy: only SageMaker training jobs of this account may assume it;
* the caller's permissions: pass that role to SageMaker only, create, describe and stop training
  jobs of this job name, upload the source code, review the runs.

A dataset and an output that overlap in one bucket are refused: the output grant (write, delete)
would reach the data.
"""

from __future__ import annotations

import re

from brainseg.io import s3
from brainseg.locations import inside

MLFLOW_SERVER_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:mlflow-tracking-server/[\w-]+")
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]+")


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    bucket, prefix = s3.parse_uri(uri)
    return bucket, prefix.rstrip("/") + "/" if prefix else ""


def _statement(sid: str, actions, resources, condition: dict | None = None) -> dict:
    statement = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        statement["Condition"] = condition
    return statement


def role_account(role_arn: str) -> str:
    """The account ID of an IAM role ARN.

    Raises:
        ValueError: not a role ARN (``arn:aws:iam::123456789012:role/name``).
    """
    match = ROLE_ARN.fullmatch(role_arn or "")
    if not match:
        raise ValueError(f"role {role_arn!r}: expected an IAM role ARN like arn:aws:iam::123456789012:role/brainseg")
    return match.group(1)


def _model_statements(models: tuple, out_bucket: str, out_prefix: str, owned: dict) -> list[dict]:
    """A prediction job's grants: read the ``models``, replace the prediction output's markers."""
    model_objects = []
    for uri in models:
        bucket, key = s3.parse_uri(uri)
        if key.endswith((".pt", ".tar.gz", ".tgz", ".json")):  # .json: a cross-validation's pooled postprocessing
            model_objects.append(f"arn:aws:s3:::{bucket}/{key}")
        else:
            folder = key.rstrip("/") + "/" if key else ""
            model_objects += [f"arn:aws:s3:::{bucket}/{folder}model/model.pt", f"arn:aws:s3:::{bucket}/{folder}model.pt"]
    if not model_objects:
        return []
    return [
        _statement("ReadModels", "s3:GetObject", model_objects, owned),
        _statement("ReplacePredictionMarkers", "s3:DeleteObject",
                   [f"arn:aws:s3:::{out_bucket}/{out_prefix}{name}"
                    for name in ("complete.json", "predictions.csv", "shards/*")], owned)]


def _service_statements(mlflow_servers: tuple, kms_keys: tuple, vpc: bool, region: str) -> list[dict]:
    """The grants beyond S3 a job's options ask for: MLflow tracking servers, KMS keys (through S3
    and the instance volumes), VPC network interfaces.

    Raises:
        ValueError: an MLflow server that is not a tracking server ARN.
    """
    statements = []
    for arn in mlflow_servers:
        if not MLFLOW_SERVER_ARN.fullmatch(arn):
            raise ValueError(f"mlflow server {arn!r}: expected a tracking server ARN like "
                             "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/brainseg")
    if mlflow_servers:
        statements.append(_statement("LogToMlflow", "sagemaker-mlflow:*", sorted(set(mlflow_servers))))
    if kms_keys:
        services = [f"s3.{region}.amazonaws.com", f"ec2.{region}.amazonaws.com"]
        statements.append(_statement("UseKmsKeysThroughS3AndVolumes",
                                     ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
                                     sorted(set(kms_keys)), {"StringLike": {"kms:ViaService": services}}))
        statements.append(_statement("GrantKmsToVolumes", "kms:CreateGrant", sorted(set(kms_keys)),
                                     {"Bool": {"kms:GrantIsForAWSResource": "true"}}))
    if vpc:
        statements.append(_statement("VpcNetworkInterfaces", [
            "ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
            "ec2:DeleteNetworkInterfacePermission", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs",
            "ec2:DescribeDhcpOptions", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"], "*"))
    return statements


def role_policy(data_uri: str, output_uri: str, account: str, job_name: str = "brainseg", index_uri: str = "",
                kms_keys: tuple = (), vpc: bool = False, init_weights_uri: str = "", region: str = "*",
                models: tuple = (), mlflow_servers: tuple = (), identity_key_uri: str = "") -> dict:
    """The job role's permissions (see the module docstring). ``models`` (run folders, model.pt or
    model.tar.gz URIs) make it a prediction job's role: it reads them and may replace the
    prediction output's markers (``complete.json``, ``predictions.csv``, ``shards/``).
    ``mlflow_servers``: SageMaker MLflow tracking servers (ARNs) the runs log to.
    ``identity_key_uri`` (``s3://…``): the identity key kept apart from the index; the role reads
    it (and creates it once), and no longer reaches a key beside an ``index_uri``.

    Raises:
        ValueError: the dataset and the output overlap.
    """
    if inside(output_uri, data_uri) or inside(data_uri, output_uri):
        raise ValueError(f"data {data_uri} and output {output_uri} overlap: the output's write and delete grant would "
                         "reach the data; put the runs under another prefix")
    data_bucket, data_prefix = _bucket_and_prefix(data_uri)
    out_bucket, out_prefix = _bucket_and_prefix(output_uri)
    owned = {"StringEquals": {"s3:ResourceAccount": account}}
    list_condition = lambda prefix: {**owned, "StringLike": {"s3:prefix": [f"{prefix}*"]}}
    if index_uri:
        index_bucket, index_key = s3.parse_uri(index_uri)
        index_objects = [f"arn:aws:s3:::{index_bucket}/{index_key}"]
        if not identity_key_uri:
            index_objects.append(f"arn:aws:s3:::{index_bucket}/{index_key}.key")
    else:
        index_objects = [f"arn:aws:s3:::{data_bucket}/{data_prefix}.brainseg/*"]
    statements = [
        _statement("ListDataset", "s3:ListBucket", f"arn:aws:s3:::{data_bucket}", list_condition(data_prefix)),
        _statement("ReadDataset", "s3:GetObject", f"arn:aws:s3:::{data_bucket}/{data_prefix}*", owned),
        _statement("ReadWriteHeaderIndex", ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                   index_objects, owned),
        _statement("ListOutput", "s3:ListBucket", f"arn:aws:s3:::{out_bucket}", list_condition(out_prefix)),
        _statement("ReadWriteOutput", ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                   f"arn:aws:s3:::{out_bucket}/{out_prefix}*", owned),
        _statement("PruneCheckpoints", "s3:DeleteObject",
                   f"arn:aws:s3:::{out_bucket}/{out_prefix}{job_name}*/checkpoints/*", owned),
        _statement("PullTrainingImage", ["ecr:GetAuthorizationToken", "ecr:BatchCheckLayerAvailability",
                                         "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"], "*"),
        _statement("Logs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                            "logs:DescribeLogStreams"], "arn:aws:logs:*:*:log-group:/aws/sagemaker/TrainingJobs*"),
        _statement("Metrics", "cloudwatch:PutMetricData", "*",
                   {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"}}),
    ]
    if identity_key_uri.startswith("s3://"):
        bucket, key = s3.parse_uri(identity_key_uri)
        statements.append(_statement("ReadCreateIdentityKey", ["s3:GetObject", "s3:PutObject"],
                                     f"arn:aws:s3:::{bucket}/{key}", owned))
    if init_weights_uri.startswith("s3://"):
        bucket, key = s3.parse_uri(init_weights_uri)
        statements.append(_statement("ReadInitWeights", "s3:GetObject", f"arn:aws:s3:::{bucket}/{key}", owned))
    statements += _model_statements(models, out_bucket, out_prefix, owned)
    statements += _service_statements(mlflow_servers, kms_keys, vpc, region)
    return {"Version": "2012-10-17", "Statement": statements}


def trust_policy(account: str, region: str = "*") -> dict:
    """Only SageMaker training jobs of ``account`` may assume the role (no confused deputy)."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": account},
                      "ArnLike": {"aws:SourceArn": f"arn:aws:sagemaker:{region}:{account}:training-job/*"}}}]}


def caller_policy(role_arn: str, output_uri: str, job_name: str = "brainseg", region: str = "*") -> dict:
    """What the person (or CI) running ``brainseg-launch`` needs: pass the role, run and review jobs."""
    account = role_account(role_arn)
    out_bucket, out_prefix = _bucket_and_prefix(output_uri)
    return {"Version": "2012-10-17", "Statement": [
        _statement("PassTheJobRoleToSageMakerOnly", "iam:PassRole", role_arn,
                   {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}),
        _statement("RunTrainingJobs", ["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob",
                                       "sagemaker:StopTrainingJob", "sagemaker:AddTags"],
                   f"arn:aws:sagemaker:{region}:{account}:training-job/{job_name}*"),
        _statement("RunTuningJobs", ["sagemaker:CreateHyperParameterTuningJob",
                                     "sagemaker:DescribeHyperParameterTuningJob",
                                     "sagemaker:StopHyperParameterTuningJob",
                                     "sagemaker:ListTrainingJobsForHyperParameterTuningJob", "sagemaker:AddTags"],
                   f"arn:aws:sagemaker:{region}:{account}:hyper-parameter-tuning-job/{job_name}*"),
        _statement("ListJobs", "sagemaker:ListTrainingJobs", "*"),
        _statement("UploadSourceAndReviewRuns", ["s3:GetObject", "s3:PutObject"],
                   f"arn:aws:s3:::{out_bucket}/{out_prefix}*"),
        _statement("ListOutputBucket", ["s3:ListBucket", "s3:GetBucketLocation"], f"arn:aws:s3:::{out_bucket}"),
        _statement("FollowJobLogs", ["logs:GetLogEvents", "logs:DescribeLogStreams", "logs:FilterLogEvents"],
                   "arn:aws:logs:*:*:log-group:/aws/sagemaker/TrainingJobs*"),
    ]}

"""Reading back what runs, prediction jobs and tuning jobs wrote (S3 or a local folder): text
summaries and the HTML report. Free of torch and MONAI."""

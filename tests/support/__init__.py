"""Test-only helpers: the fault-injecting S3 server and the DICOM header fuzzer (tests and benchmarks
use them; the product never imports them)."""

"""What batchd tells its operators: Prometheus metrics and structured logs."""

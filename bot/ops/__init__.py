"""Operations: metrics and health endpoints, log formatting and redaction."""

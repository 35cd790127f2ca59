"""Loggers of conf/logger that need more than Lightning's constructors."""

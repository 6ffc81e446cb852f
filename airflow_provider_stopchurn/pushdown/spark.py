"""Spark as a warehouse, at its former import path: use :mod:`airflow_provider_stopchurn.warehouse.spark` instead."""

from __future__ import annotations

from airflow_provider_stopchurn.warehouse.spark import SparkWarehouse, spark_identifier

__all__ = ["SparkWarehouse", "spark_identifier"]

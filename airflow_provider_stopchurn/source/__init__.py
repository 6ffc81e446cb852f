"""Reading a table and canonicalizing it (no Airflow import).

SQL results as Arrow batches; DataFrames and Arrow columns as canonical values.
"""

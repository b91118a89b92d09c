"""Pipeline stages as plain, typed library functions (Prefect wrappers live in flows/)."""

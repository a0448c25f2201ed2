-- One PostgreSQL for the stack, one database per service (POSTGRES_DB=medml is the default).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE catalog;

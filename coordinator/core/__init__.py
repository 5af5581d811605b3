"""What every part of the coordinator stands on: settings, the database and its tables, the API's
errors, request deadlines and body limits, rate-limit buckets. Imports nothing else of the coordinator."""

"""Pipeline stages: each reads files, writes one append-only JSONL (plus a datasets export) and resumes."""

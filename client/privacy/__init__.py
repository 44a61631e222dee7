"""The institution's privacy state: its one owner.

- `ledger`: the SQLite file that keeps budgets, grants, plans and every release, per data set.
- `budget`: what the institution operator alone sets: a data set's identity and its budget.
- `grant`: what a job gets: the institution's terms applied to the job's request, round by round.

`client/round.py` only asks these modules; nothing here takes a number from the coordinator except
as a request that is granted at most what is left.
"""

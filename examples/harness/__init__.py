"""The comparison harness behind `examples/compare.py`: tasks and rows
(`tasks`), training them (`runs`), merging runs (`merge`), the figures
(`analysis`), the summary and files (`report`) and the plots (`plots`);
`cli` ties them to the command line."""

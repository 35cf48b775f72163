"""The models and what every job needs of them: frequency filters, control net, teacher, student, weight files,
precision, the error a job stops with (`errors.RunError`), and the one translation pipeline. Imports only `ldm`
and itself."""

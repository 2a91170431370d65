"""MT-bench (Zheng et al., 2023): multi-turn questions answered by the model under test and graded by an LLM judge,
following FastChat's llm_judge (github.com/lm-sys/FastChat, fastchat/llm_judge) in its prompts, sampling
temperatures, judging rules, file formats and result tables.

Modules: data (questions, judge prompts, reference answers), answers (answer generation through
jvila.eval.chat_client), verdicts (reading ratings and verdicts from judge text), judging (single and pairwise
grading), judgment_files (their JSONL formats), results (the tables), cli (`jvila eval mt-bench`).

Where this differs from FastChat, on purpose:
- Answers are asked with no system message unless one is given (`system=`); FastChat's API path sends its
  conversation template's (for a model it does not know, the "one_shot" template's "A chat between a curious
  human and an artificial intelligence assistant..."). The served model's chat template applies its own default.
- Reference answers come from one named file (reference_answer/gpt-4.jsonl by default) whoever the judge is;
  FastChat looks for a file named after the judge model, which exists only for gpt-4.
- An endpoint that stays unreachable or refuses a request stops the run with an error naming the question;
  FastChat writes "$ERROR$" as the answer or judgment and goes on. Finished work is kept either way, and a run
  resumes where it stopped (FastChat regenerates and rejudges everything).
- A question file's `required_temperature` and --force-temperature may both be present; the latter wins
  (FastChat refuses the combination).
"""

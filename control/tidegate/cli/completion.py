"""Shell completion through argcomplete: the shell runs `tidegate` itself
with the command line in its environment, and the same parser that runs the
verbs answers (verbs, options, choices, files). Beyond the parser: rule
names for `set-limit` from the agent's active rule set, version numbers
from the agent's version list (`show`, `review`, `diff`, `rollback --to`),
and interface names for `detach`. An agent that does not answer within a
second adds nothing, silently.

`tidegate completion bash|zsh` prints the script that hooks it in."""

from __future__ import annotations

import argparse
import os

import yaml

from tidegate.client import ClientError
from tidegate.cli.options import CONNECTION_DEFAULTS
from tidegate.cli.verb import arg, client_of

AGENT_SECONDS = 1.0  # at most this long per call to the agent while completing

HEADER = {
    "bash": "# bash completion for tidegate (argcomplete)\n"
            "# use: source <(tidegate completion bash)   or save it in /etc/bash_completion.d/tidegate\n",
    "zsh": "#compdef tidegate\n"
           "# zsh completion for tidegate (argcomplete, through zsh's bash completion)\n"
           "# use: source <(tidegate completion zsh)   or save it as _tidegate in a directory of $fpath\n"
           "autoload -U +X bashcompinit && bashcompinit\n",
}  # fmt: skip
ZSH_FIRST_CALL = """if [[ "$funcstack[1]" == "_tidegate" ]]; then
    _bash_complete -o nospace -o default -o bashdefault -F _python_argcomplete_tidegate
fi
"""


def script(shell: str) -> str:
    """The completion script for bash or zsh (zsh runs the bash one through bashcompinit)."""
    import argcomplete  # lazy: only `completion` and the shell's requests need it

    # the script named, not the word the shell passes: zsh's bash layer does not pass it the same way
    body = argcomplete.shellcode(["tidegate"], shell="bash", argcomplete_script="tidegate")
    return HEADER[shell] + body + (ZSH_FIRST_CALL if shell == "zsh" else "")


def complete(parser: argparse.ArgumentParser) -> None:
    """Answers the shell's request (the environment holds the command line) and exits."""
    import argcomplete  # lazy: see script()

    argcomplete.autocomplete(parser, always_complete_options=False)


def _agent(parsed_args):
    connection = argparse.Namespace(**(CONNECTION_DEFAULTS | vars(parsed_args)))
    cl = client_of(connection)
    cl.timeout = min(connection.timeout, AGENT_SECONDS)
    return cl


def versions(prefix: str, parsed_args, **_) -> list[str]:
    """Version numbers the agent keeps, newest first."""
    try:
        cl = _agent(parsed_args)
        r = cl.call("ListVersions", cl.pb.ListVersionsRequest(limit=100))
    except ClientError:
        return []
    return [str(v.number) for v in r.versions]


def version_arg():
    """The positional VERSION of show and review, completed from the agent."""
    return arg("version", type=int, metavar="VERSION", completer=versions)


def rule_names(prefix: str, parsed_args, **_) -> list[str]:
    """The active rule set's rule names, and `default`."""
    try:
        cl = _agent(parsed_args)
        active = cl.call("GetStatus", cl.pb.GetStatusRequest()).active_version
        text = cl.call("GetVersion", cl.pb.GetVersionRequest(number=active)).yaml if active else ""
    except ClientError:
        return ["default"]
    rules = (yaml.safe_load(text) or {}).get("rules") or []
    return [r["name"] for r in rules if isinstance(r, dict) and "name" in r] + ["default"]


def interfaces(prefix: str, **_) -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []

"""What the emulator's two template languages share: evaluating intrinsic functions.

AWS IoT provisioning templates (templates.py) use a subset of CloudFormation's intrinsic functions
(cfn_functions.py): Ref, Fn::Join, Fn::Select, Fn::Split, Fn::FindInMap, Fn::Sub, Fn::If and, inside the
Conditions section, Fn::Equals, Fn::Not, Fn::And, Fn::Or and {"Condition": name}. IntrinsicEvaluator walks
nodes, resolves conditions (each once, refusing cycles) and implements the functions both languages evaluate
alike. A subclass says what differs: how values are checked and how its errors read, what Ref, Fn::Sub and
Fn::Select do, and which further functions it allows (it adds them to ``_functions``).

Every method takes ``where``, the path of the node in the template, for error messages.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Optional

from fleetprov.errors import EmulatorError

Json = Any  # a parsed JSON or YAML value: dict, list, str, int, float, bool, None; mid-evaluation also NO_VALUE

NO_VALUE_NAME = "AWS::NoValue"
SUB_VARIABLE = re.compile(r"\$\{(!?)([^}]*)\}")  # ${Name}, or ${!Name} for a literal "${Name}"
CONDITION_FUNCTIONS = frozenset({"Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"})


class _NoValue:
    """What {"Ref": "AWS::NoValue"} evaluates to: the enclosing mapping or list drops the entry."""

    def __repr__(self) -> str:
        return NO_VALUE_NAME


NO_VALUE = _NoValue()


def function_name(node: Json) -> Optional[str]:
    """The intrinsic function a node calls: a mapping whose single key is Fn::*, Ref or Condition."""
    if isinstance(node, dict) and len(node) == 1:
        (key,) = node
        if isinstance(key, str) and (key.startswith("Fn::") or key in ("Ref", "Condition")):
            return key
    return None


class IntrinsicEvaluator(ABC):
    """Evaluates the nodes of one template; conditions are evaluated once and remembered."""

    def __init__(self, conditions: Mapping[str, Json]) -> None:
        self._condition_definitions = conditions
        self._condition_values: dict[str, bool] = {}
        self._conditions_being_resolved: list[str] = []
        self._in_conditions_section = False
        # The provisioning-template language's functions; a CloudFormation evaluator adds its own.
        self._functions: dict[str, Callable[[Json, str], Json]] = {
            "Ref": self._ref,
            "Fn::Join": self._join,
            "Fn::Select": self._select,
            "Fn::Split": self._split,
            "Fn::FindInMap": self._find_in_map,
            "Fn::Sub": self._sub,
            "Fn::If": self._if,
            "Fn::Equals": self._equals,
            "Fn::Not": self._not,
            "Fn::And": self._and,
            "Fn::Or": self._or,
            "Condition": self._condition_reference,
        }

    # -- what a language says: errors, checks, and the functions it evaluates its own way ----------

    @abstractmethod
    def _error(self, where: str, problem: str) -> EmulatorError:
        """The language's error for a problem at ``where``."""

    @abstractmethod
    def _quote(self, name: str) -> str:
        """A name from the template, as an error message shows it."""

    @abstractmethod
    def _misplaced(self, function: str, where: str) -> EmulatorError:
        """A condition function called outside the Conditions section."""

    @abstractmethod
    def _unknown(self, function: str, where: str) -> EmulatorError:
        """A function the language (or the emulator) does not evaluate."""

    @abstractmethod
    def _condition_result(self, value: Json, where: str) -> bool:
        """A condition's evaluated definition, checked to be a boolean."""

    @abstractmethod
    def _argument_list(self, argument: Json, where: str, count: int) -> list[Json]:
        """A function's ``count`` arguments, checked but not evaluated."""

    @abstractmethod
    def _operand_list(self, argument: Json, where: str) -> list[Json]:
        """The 2 to 10 conditions of Fn::And or Fn::Or, checked but not evaluated."""

    @abstractmethod
    def _if_arguments(self, argument: Json, where: str) -> tuple[str, Json, Json]:
        """Fn::If's [condition name, value if true, value if false], not evaluated."""

    @abstractmethod
    def _condition_name(self, argument: Json, where: str) -> str:
        """The argument of {"Condition": name}."""

    @abstractmethod
    def _text(self, value: Json, where: str) -> str:
        """A scalar as text: what Fn::Join joins, Fn::Equals compares and Fn::FindInMap looks up."""

    @abstractmethod
    def _string(self, value: Json, where: str) -> str:
        """A delimiter of Fn::Join or Fn::Split, or the string Fn::Split splits."""

    @abstractmethod
    def _list(self, value: Json, where: str) -> list[Json]:
        """The list Fn::Join joins."""

    @abstractmethod
    def _boolean(self, value: Json, where: str) -> bool:
        """An evaluated operand of Fn::Not, Fn::And or Fn::Or."""

    @abstractmethod
    def _map_key(self, key: str) -> str:
        """A Fn::FindInMap key as the path of a missing entry shows it."""

    @abstractmethod
    def _mappings(self) -> Mapping[str, Json]:
        """The Mappings section."""

    @abstractmethod
    def _ref(self, argument: Json, where: str) -> Json: ...

    @abstractmethod
    def _sub(self, argument: Json, where: str) -> str: ...

    @abstractmethod
    def _select(self, argument: Json, where: str) -> Json: ...

    # -- conditions -----------------------------------------------------------------------------

    def condition(self, name: str, where: str) -> bool:
        if name in self._condition_values:
            return self._condition_values[name]
        if name not in self._condition_definitions:
            raise self._error(where, f"unknown condition {self._quote(name)}")
        if name in self._conditions_being_resolved:
            cycle = [*self._conditions_being_resolved[self._conditions_being_resolved.index(name) :], name]
            raise self._error(f"Conditions.{name}", f"circular reference: {' -> '.join(cycle)}")
        self._conditions_being_resolved.append(name)
        outer, self._in_conditions_section = self._in_conditions_section, True
        try:
            value = self.value(self._condition_definitions[name], f"Conditions.{name}")
        finally:
            self._in_conditions_section = outer
            self._conditions_being_resolved.pop()
        self._condition_values[name] = self._condition_result(value, f"Conditions.{name}")
        return self._condition_values[name]

    # -- values ---------------------------------------------------------------------------------

    def value(self, node: Json, where: str) -> Json:
        """The evaluated node; it may be NO_VALUE, which the enclosing mapping or list drops."""
        function = function_name(node)
        if function is not None:
            return self._call(function, node[function], where)
        if isinstance(node, dict):
            return self.object_value(node, where)
        if isinstance(node, list):
            evaluated = [self.value(item, f"{where}[{index}]") for index, item in enumerate(node)]
            return [item for item in evaluated if item is not NO_VALUE]
        return node

    def object_value(self, node: Mapping[str, Json], where: str) -> dict[str, Json]:
        evaluated = {key: self.value(item, f"{where}.{key}") for key, item in node.items()}
        return {key: item for key, item in evaluated.items() if item is not NO_VALUE}

    def text(self, node: Json, where: str) -> str:
        return self._text(self.value(node, where), where)

    def _call(self, function: str, argument: Json, where: str) -> Json:
        if function in CONDITION_FUNCTIONS and not self._in_conditions_section:
            raise self._misplaced(function, where)
        implementation = self._functions.get(function)
        if implementation is None:
            raise self._unknown(function, where)
        return implementation(argument, f"{where}.{function}")

    def _arguments(self, argument: Json, where: str, count: int) -> list[Json]:
        # Evaluated one by one rather than as a list, so that AWS::NoValue cannot shift positions.
        arguments = self._argument_list(argument, where, count)
        return [self.value(item, f"{where}[{index}]") for index, item in enumerate(arguments)]

    # -- the functions both languages evaluate alike ----------------------------------------------

    def _join(self, argument: Json, where: str) -> str:
        delimiter, values = self._arguments(argument, where, 2)
        items = self._list(values, f"{where}[1]")
        texts = [self._text(item, f"{where}[1][{index}]") for index, item in enumerate(items)]
        return self._string(delimiter, f"{where}[0]").join(texts)

    def _split(self, argument: Json, where: str) -> list[str]:
        delimiter, source = self._arguments(argument, where, 2)
        separator = self._string(delimiter, f"{where}[0]")
        if not separator:
            raise self._error(f"{where}[0]", "the delimiter must not be empty")
        return self._string(source, f"{where}[1]").split(separator)

    def _find_in_map(self, argument: Json, where: str) -> Json:
        arguments = self._arguments(argument, where, 3)
        keys = [self._text(key, f"{where}[{index}]") for index, key in enumerate(arguments)]
        found: Json = self._mappings()
        path = "Mappings"
        for key in keys:
            path = f"{path}.{self._map_key(key)}"
            if not isinstance(found, Mapping) or key not in found:
                raise self._error(where, f"{path} does not exist")
            found = found[key]
        return found

    def _if(self, argument: Json, where: str) -> Json:
        name, if_true, if_false = self._if_arguments(argument, where)
        # Only the chosen branch is evaluated, as in AWS: the other may be invalid here (a resource left out).
        if self.condition(name, f"{where}[0]"):
            return self.value(if_true, f"{where}[1]")
        return self.value(if_false, f"{where}[2]")

    def _equals(self, argument: Json, where: str) -> bool:
        left, right = self._arguments(argument, where, 2)
        return self._text(left, f"{where}[0]") == self._text(right, f"{where}[1]")

    def _not(self, argument: Json, where: str) -> bool:
        (operand,) = self._arguments(argument, where, 1)
        return not self._boolean(operand, f"{where}[0]")

    def _and(self, argument: Json, where: str) -> bool:
        return all(self._operands(argument, where))

    def _or(self, argument: Json, where: str) -> bool:
        return any(self._operands(argument, where))

    def _operands(self, argument: Json, where: str) -> list[bool]:
        # All operands are evaluated (no short-circuit), so a broken one fails whatever the others say.
        operands = self._operand_list(argument, where)
        return [
            self._boolean(self.value(operand, f"{where}[{index}]"), f"{where}[{index}]")
            for index, operand in enumerate(operands)
        ]

    def _condition_reference(self, argument: Json, where: str) -> bool:
        return self.condition(self._condition_name(argument, where), where)

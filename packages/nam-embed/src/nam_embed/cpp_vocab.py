"""The C++ structure vocabulary: node-type ids, categories and dependency-level scopes.

This module is data (no parser import, no torch), so the default StructureSchema can size itself
without the ``cpp`` extra, and nam-train's data workers can use it without torch.

Node-type ids are frozen: id 0 is ``<none>`` (the token covers no source byte, e.g. a special
token with an empty span), id 1 is ``<unknown>`` (a node type not listed here, e.g. from a newer
grammar), then the named node types of tree-sitter-cpp 0.23.4 in alphabetical order, then
tree-sitter's ``ERROR``. New grammar types go to ``<unknown>``; appending to the end is the only
change that keeps old checkpoints meaningful.
"""

from __future__ import annotations

CHANNELS = ("category", "dependency", "depth", "sibling", "node_type")
"""The five channels the C++ extractor writes, in the default schema's order."""

CATEGORIES = ("other", "preprocessor", "declaration", "statement", "expression", "comment", "literal")
"""Structure categories, by id. A token's category is that of the innermost node around it (itself
included) that has one; ``other`` when none has (e.g. a bare identifier at file scope)."""

_GRAMMAR_NAMED_TYPES = (
    "abstract_array_declarator",
    "abstract_function_declarator",
    "abstract_parenthesized_declarator",
    "abstract_pointer_declarator",
    "abstract_reference_declarator",
    "access_specifier",
    "alias_declaration",
    "alignas_qualifier",
    "alignof_expression",
    "argument_list",
    "array_declarator",
    "assignment_expression",
    "attribute",
    "attribute_declaration",
    "attribute_specifier",
    "attributed_declarator",
    "attributed_statement",
    "auto",
    "base_class_clause",
    "binary_expression",
    "bitfield_clause",
    "break_statement",
    "call_expression",
    "case_statement",
    "cast_expression",
    "catch_clause",
    "char_literal",
    "character",
    "class_specifier",
    "co_await_expression",
    "co_return_statement",
    "co_yield_statement",
    "comma_expression",
    "comment",
    "compound_literal_expression",
    "compound_requirement",
    "compound_statement",
    "concatenated_string",
    "concept_definition",
    "condition_clause",
    "conditional_expression",
    "constraint_conjunction",
    "constraint_disjunction",
    "continue_statement",
    "declaration",
    "declaration_list",
    "decltype",
    "default_method_clause",
    "delete_expression",
    "delete_method_clause",
    "dependent_name",
    "dependent_type",
    "destructor_name",
    "do_statement",
    "else_clause",
    "enum_specifier",
    "enumerator",
    "enumerator_list",
    "escape_sequence",
    "explicit_function_specifier",
    "expression_statement",
    "extension_expression",
    "false",
    "field_declaration",
    "field_declaration_list",
    "field_designator",
    "field_expression",
    "field_identifier",
    "field_initializer",
    "field_initializer_list",
    "fold_expression",
    "for_range_loop",
    "for_statement",
    "friend_declaration",
    "function_declarator",
    "function_definition",
    "generic_expression",
    "gnu_asm_clobber_list",
    "gnu_asm_expression",
    "gnu_asm_goto_list",
    "gnu_asm_input_operand",
    "gnu_asm_input_operand_list",
    "gnu_asm_output_operand",
    "gnu_asm_output_operand_list",
    "gnu_asm_qualifier",
    "goto_statement",
    "identifier",
    "if_statement",
    "init_declarator",
    "init_statement",
    "initializer_list",
    "initializer_pair",
    "labeled_statement",
    "lambda_capture_initializer",
    "lambda_capture_specifier",
    "lambda_default_capture",
    "lambda_expression",
    "linkage_specification",
    "literal_suffix",
    "ms_based_modifier",
    "ms_call_modifier",
    "ms_declspec_modifier",
    "ms_pointer_modifier",
    "ms_restrict_modifier",
    "ms_signed_ptr_modifier",
    "ms_unaligned_ptr_modifier",
    "ms_unsigned_ptr_modifier",
    "namespace_alias_definition",
    "namespace_definition",
    "namespace_identifier",
    "nested_namespace_specifier",
    "new_declarator",
    "new_expression",
    "noexcept",
    "null",
    "number_literal",
    "offsetof_expression",
    "operator_cast",
    "operator_name",
    "optional_parameter_declaration",
    "optional_type_parameter_declaration",
    "parameter_declaration",
    "parameter_list",
    "parameter_pack_expansion",
    "parenthesized_declarator",
    "parenthesized_expression",
    "placeholder_type_specifier",
    "pointer_declarator",
    "pointer_expression",
    "pointer_type_declarator",
    "preproc_arg",
    "preproc_call",
    "preproc_def",
    "preproc_defined",
    "preproc_directive",
    "preproc_elif",
    "preproc_elifdef",
    "preproc_else",
    "preproc_function_def",
    "preproc_if",
    "preproc_ifdef",
    "preproc_include",
    "preproc_params",
    "primitive_type",
    "pure_virtual_clause",
    "qualified_identifier",
    "raw_string_content",
    "raw_string_delimiter",
    "raw_string_literal",
    "ref_qualifier",
    "reference_declarator",
    "requirement_seq",
    "requires_clause",
    "requires_expression",
    "return_statement",
    "seh_except_clause",
    "seh_finally_clause",
    "seh_leave_statement",
    "seh_try_statement",
    "simple_requirement",
    "sized_type_specifier",
    "sizeof_expression",
    "statement_identifier",
    "static_assert_declaration",
    "storage_class_specifier",
    "string_content",
    "string_literal",
    "struct_specifier",
    "structured_binding_declarator",
    "subscript_argument_list",
    "subscript_designator",
    "subscript_expression",
    "subscript_range_designator",
    "switch_statement",
    "system_lib_string",
    "template_argument_list",
    "template_declaration",
    "template_function",
    "template_instantiation",
    "template_method",
    "template_parameter_list",
    "template_template_parameter_declaration",
    "template_type",
    "this",
    "throw_specifier",
    "throw_statement",
    "trailing_return_type",
    "translation_unit",
    "true",
    "try_statement",
    "type_definition",
    "type_descriptor",
    "type_identifier",
    "type_parameter_declaration",
    "type_qualifier",
    "type_requirement",
    "unary_expression",
    "union_specifier",
    "update_expression",
    "user_defined_literal",
    "using_declaration",
    "variadic_declarator",
    "variadic_parameter_declaration",
    "variadic_type_parameter_declaration",
    "virtual_specifier",
    "while_statement",
)

NODE_TYPES: tuple[str, ...] = ("<none>", "<unknown>", *_GRAMMAR_NAMED_TYPES, "ERROR")
NODE_TYPE_IDS: dict[str, int] = {name: i for i, name in enumerate(NODE_TYPES)}
NONE_ID = 0
UNKNOWN_ID = 1

_LITERALS = frozenset({"concatenated_string", "true", "false", "null"})
_STATEMENTS = frozenset({"for_range_loop"})
_DECLARATIONS = frozenset(
    {
        "declaration",
        "class_specifier",
        "struct_specifier",
        "union_specifier",
        "enum_specifier",
        "type_definition",
        "linkage_specification",
        "template_instantiation",
    }
)


def category_of(node_type: str) -> int | None:
    """Category id a node type gives its tokens, or None if it defers to its parent."""
    if node_type == "comment":
        return CATEGORIES.index("comment")
    if node_type.startswith("preproc_"):
        return CATEGORIES.index("preprocessor")
    if node_type.endswith("_literal") or node_type in _LITERALS:
        return CATEGORIES.index("literal")
    if node_type.endswith("_expression"):
        return CATEGORIES.index("expression")
    if node_type.endswith("_statement") or node_type in _STATEMENTS:
        return CATEGORIES.index("statement")
    if node_type.endswith(("_declaration", "_definition")) or node_type in _DECLARATIONS:
        return CATEGORIES.index("declaration")
    return None


SCOPE_BODIES = frozenset({"declaration_list", "field_declaration_list", "enumerator_list"})
"""Bodies that open a dependency level: namespace and extern "C" bodies, class/struct/union
bodies, enum bodies; and a compound_statement whose parent is in FUNCTION_TYPES (a function or
lambda body, not an inner block)."""

FUNCTION_TYPES = frozenset({"function_definition", "lambda_expression"})

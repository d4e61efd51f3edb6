// The API reference: every path and method of openapi.json, with its request and response
// schemas, drawn here (no build step). Nested schemas open on demand, so the page stays small.
"use strict";

const { element } = MlxPages;
const MAX_DEPTH = 12;
let components = {};

function resolve(schema) {
  let resolved = schema;
  for (let hops = 0; resolved && resolved.$ref && hops < 20; hops += 1) {
    resolved = components[resolved.$ref.split("/").pop()];
  }
  return resolved || {};
}

function typeName(schema) {
  if (!schema) return "any";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.enum) return schema.enum.map((value) => JSON.stringify(value)).join(" | ");
  const union = schema.anyOf || schema.oneOf;
  if (union) return union.map(typeName).join(" | ");
  if (schema.allOf) return schema.allOf.map(typeName).join(" & ");
  if (schema.type === "array") return `${typeName(schema.items)}[]`;
  if (Array.isArray(schema.type)) return schema.type.join(" | ");
  return schema.type || "any";
}

// The schemas a value may take that have fields or items worth opening.
function nested(schema) {
  const options = schema.anyOf || schema.oneOf || schema.allOf || [schema];
  return options
    .map((option) => (option.type === "array" ? option.items : option))
    .map(resolve)
    .filter((option) => option.properties || option.anyOf || option.oneOf || option.allOf);
}

function schemaList(schema, depth) {
  const list = element("ul");
  const target = resolve(schema);
  const required = new Set(target.required || []);
  const properties = Object.entries(target.properties || {});
  if (!properties.length) {
    for (const option of nested(target)) {
      if (option !== target) list.append(schemaItem(typeName(option), option, false, depth));
    }
    if (!list.children.length) list.append(element("li", "type", typeName(schema)));
  }
  for (const [name, property] of properties) {
    list.append(schemaItem(name, property, required.has(name), depth));
  }
  return list;
}

function schemaItem(name, property, isRequired, depth) {
  const item = element("li");
  const line = [element("span", "prop", name), " ", element("span", "type", typeName(property))];
  if (isRequired) line.push(" ", element("span", "required", "required"));
  const description = property.description || resolve(property).description;
  if (description) line.push(" ", element("span", "muted", `— ${description}`));
  const inner = nested(property);
  if (!inner.length || depth >= MAX_DEPTH) {
    item.append(...line);
    return item;
  }
  const details = element("details");
  const summary = element("summary");
  summary.append(...line);
  details.append(summary);
  details.addEventListener("toggle", () => {
    if (details.open && details.children.length === 1) details.append(schemaList(property, depth + 1));
  }, { once: false });
  item.append(details);
  return item;
}

function schemaBlock(title, content) {
  const block = element("div", "schema");
  block.append(element("h4", "", title));
  for (const [mediaType, { schema }] of Object.entries(content || {})) {
    const top = element("details");
    top.open = true;
    const summary = element("summary");
    summary.append(element("code", "", mediaType), " ", element("span", "type", typeName(schema)));
    top.append(summary, schemaList(schema, 0));
    block.append(top);
  }
  return block;
}

function operationSection(path, method, operation) {
  const section = element("section", "operation panel");
  section.id = `${method}-${path}`;
  const heading = element("h3");
  heading.append(element("span", `method ${method}`, method.toUpperCase()), element("code", "", path));
  section.append(heading, element("p", "", operation.summary || ""));
  for (const parameter of operation.parameters || []) {
    section.append(element("p", "muted", `${parameter.in} parameter ${parameter.name}: ${typeName(parameter.schema)}`));
  }
  if (operation.requestBody) section.append(schemaBlock("Request body", operation.requestBody.content));
  for (const [status, response] of Object.entries(operation.responses || {})) {
    const title = `Response ${status === "default" ? "(an error)" : status}: ${response.description || ""}`;
    section.append(schemaBlock(title, response.content));
  }
  return section;
}

function render(document_) {
  components = document_.components?.schemas || {};
  document.getElementById("title").textContent = `${document_.info.title} API`;
  document.getElementById("version").textContent = `version ${document_.info.version}, OpenAPI ${document_.openapi}`;
  const toc = document.getElementById("toc");
  const operations = document.getElementById("operations");
  toc.replaceChildren();
  operations.replaceChildren();
  for (const [path, item] of Object.entries(document_.paths)) {
    for (const [method, operation] of Object.entries(item)) {
      const section = operationSection(path, method, operation);
      operations.append(section);
      const link = element("a", "", `${method.toUpperCase()} ${path}`);
      link.href = `#${section.id}`;
      const entry = element("li");
      entry.append(link);
      toc.append(entry);
    }
  }
}

async function load() {
  const status = document.getElementById("loading");
  try {
    const response = await MlxPages.apiFetch("openapi.json");
    if (!response.ok) throw new Error(await MlxPages.errorText(response));
    render(await response.json());
    status.hidden = true;
  } catch (error) {
    status.textContent = `Could not read openapi.json: ${error.message}`;
  }
}

MlxPages.installKeyForm(load);
load();

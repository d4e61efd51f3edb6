// Shared by the status page and the API reference: the API key and fetching with it.
// Every URL is relative to the page, so the pages work under the server's --root-path.
"use strict";

const KEY_STORAGE = "mlx-engine-server.api-key";

const MlxPages = {
  apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  },

  headers(extra = {}) {
    const key = MlxPages.apiKey();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  },

  // fetch() with the key; on a 401 the key form is shown and the promise rejects.
  async apiFetch(url, options = {}) {
    const response = await fetch(url, { ...options, headers: MlxPages.headers(options.headers) });
    if (response.status === 401) {
      MlxPages.askForKey(MlxPages.apiKey() ? "That key was refused." : "This server needs an API key.");
      throw new Error("an API key is needed");
    }
    return response;
  },

  // The form in the page (never a prompt()): the key goes to sessionStorage only, so it is
  // gone when the tab closes, and is sent only to this origin.
  askForKey(reason) {
    const form = document.getElementById("key-form");
    document.getElementById("key-reason").textContent = reason;
    form.hidden = false;
    document.getElementById("key-input").focus();
  },

  installKeyForm(onKey) {
    const form = document.getElementById("key-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = document.getElementById("key-input");
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      input.value = "";
      form.hidden = true;
      onKey();
    });
  },

  // The error message of an OpenAI-shaped error body, else the status line.
  async errorText(response) {
    try {
      const body = await response.json();
      return body.error?.message || `${response.status} ${response.statusText}`;
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  },

  element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  },
};

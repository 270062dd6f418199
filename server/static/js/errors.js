// How the console shows a refusal: the server's message, in the panel's error line.
import { ApiError } from "./api.js";
import { $ } from "./dom.js";

// The server's message, without msgspec's " - at `$.field`" (the field is named in words instead).
export function errorText(err) {
  return err instanceof ApiError ? err.message.replace(/ - at `\$[^`]*`$/, "") : "Something went wrong; try again.";
}

// Shows an error; with a form, the field the server named (its `data-field`) is marked and named.
export function fail(target, form = null) {
  return (err) => {
    const input = form && err instanceof ApiError && err.field ? $(form).querySelector(`[data-field="${CSS.escape(err.field)}"]`) : null;
    const label = input?.closest("label")?.firstChild?.textContent?.trim();
    $(target).textContent = label ? `${label}: ${errorText(err)}` : errorText(err);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.addEventListener("input", () => input.removeAttribute("aria-invalid"), { once: true });
      input.focus();
    }
  };
}

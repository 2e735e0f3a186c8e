// A protocol reply as C# reads it, plain C# values only (nothing to dispose): `reply.success`, `reply.workflow.id`,
// `reply["status"]`. Missing members read as null (the protocol adds fields
// freely), PascalCase reads its snake_case field (`reply.SessionId`).
using System;
using System.Collections;
using System.Collections.Generic;
using System.Dynamic;
using System.Globalization;
using System.Text;

namespace EmbeddedWorker
{
    public sealed class Reply : DynamicObject
    {
        readonly Dictionary<string, object> fields;

        public Reply(Dictionary<string, object> fields)
        {
            this.fields = fields;
        }

        public static Reply Failure(string code, string message, string pythonTraceback = null)
        {
            var fields = new Dictionary<string, object> { { "success", false }, { "error", message }, { "error_code", code } };
            if (pythonTraceback != null) fields["python_traceback"] = pythonTraceback;
            return new Reply(fields);
        }

        public bool Success { get { return Equals(this["success"], true); } }
        public string Error { get { return this["error"] as string; } }
        public string ErrorCode { get { return this["error_code"] as string; } }
        /// <summary>Where Python raised through the boundary: its traceback as Python prints it; null otherwise.</summary>
        public string PythonTraceback { get { return this["python_traceback"] as string; } }
        /// <summary>The error code as an enum (None on success); see WorkerErrors.cs.</summary>
        public WorkerErrorCode Code { get { return WorkerErrorCodes.Parse(ErrorCode); } }

        /// <summary>This reply when it succeeded; a WorkerException with its code otherwise.</summary>
        public Reply EnsureSuccess()
        {
            if (!Success) throw new WorkerException(ErrorCode, Error, this);
            return this;
        }

        internal Dictionary<string, object> Fields { get { return fields; } }

        public object this[string name]
        {
            get
            {
                object value;
                if (fields.TryGetValue(name, out value)) return value;
                var snake = PyConvert.SnakeCase(name);  // a missing field is looked up once more only when spelled otherwise
                return !ReferenceEquals(snake, name) && fields.TryGetValue(snake, out value) ? value : null;
            }
        }

        public bool Has(string name)
        {
            return fields.ContainsKey(name) || fields.ContainsKey(PyConvert.SnakeCase(name));
        }

        public string Text(string name) { return this[name] as string; }

        public long Number(string name, long fallback = 0)
        {
            var value = this[name];
            return value is long ? (long)value : value is double ? (long)(double)value : fallback;
        }

        public IList<object> List(string name) { return this[name] as IList<object> ?? new List<object>(); }

        public IEnumerable<string> Names { get { return fields.Keys; } }

        public override bool TryGetMember(GetMemberBinder binder, out object result)
        {
            result = this[binder.Name];
            return true;
        }

        public override IEnumerable<string> GetDynamicMemberNames() { return fields.Keys; }

        public override string ToString()
        {
            var text = new StringBuilder();
            Write(text, this);
            return text.ToString();
        }

        static void Write(StringBuilder text, object value)
        {
            var reply = value as Reply;
            if (value == null) text.Append("null");
            else if (value is bool) text.Append((bool)value ? "true" : "false");
            else if (value is string) WriteString(text, (string)value);
            else if (value is double || value is float || value is decimal)
                text.Append(Convert.ToDouble(value, CultureInfo.InvariantCulture).ToString("R", CultureInfo.InvariantCulture));
            else if (value is long || value is int || value is short || value is byte || value is uint || value is ushort)
                text.Append(Convert.ToInt64(value, CultureInfo.InvariantCulture).ToString(CultureInfo.InvariantCulture));
            else if (reply != null || value is IDictionary)
            {
                text.Append('{');
                bool first = true;
                foreach (DictionaryEntry pair in reply != null ? (IDictionary)reply.fields : (IDictionary)value)
                {
                    if (!first) text.Append(", ");
                    first = false;
                    WriteString(text, Convert.ToString(pair.Key, CultureInfo.InvariantCulture));
                    text.Append(": ");
                    Write(text, pair.Value);
                }
                text.Append('}');
            }
            else if (value is IEnumerable)
            {
                text.Append('[');
                bool first = true;
                foreach (var item in (IEnumerable)value)
                {
                    if (!first) text.Append(", ");
                    first = false;
                    Write(text, item);
                }
                text.Append(']');
            }
            else WriteString(text, value.ToString());
        }

        static void WriteString(StringBuilder text, string value)
        {
            text.Append('"');
            foreach (char c in value)
            {
                if (c == '"' || c == '\\') text.Append('\\').Append(c);
                else if (c < ' ') text.Append("\\u").Append(((int)c).ToString("x4"));
                else text.Append(c);
            }
            text.Append('"');
        }
    }
}

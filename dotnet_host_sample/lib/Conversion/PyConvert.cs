// Design notes
// - Requests cross as Python dicts built directly from C# values: anonymous
//   objects and POCOs (property names turned into snake_case), dictionaries,
//   lists, strings, numbers, booleans, enums, Guids and DateTimes. No JSON
//   is written or parsed on this path.
// - This is the pythonnet path, kept where the C API path (RequestWriter,
//   ReplyReader) is unavailable and for callers holding PyObjects.
// - Replies come back as `Reply`, a DynamicObject over plain C# values
//   (string, long, double, bool, null, Reply, List<object>), converted in the
//   same GIL hold as the call, so no PyObject outlives it and nothing needs
//   disposing by the caller.
// - Call everything here with the GIL held.
#pragma warning disable 612  // PyObject.Handle: read only while the object is alive, as the C API path needs
using System;
using System.Collections;
using System.Collections.Generic;
using System.Globalization;
using System.Reflection;
using System.Text;
using Python.Runtime;

namespace EmbeddedWorker
{
    public static class PyConvert
    {
        /// <summary>A new Python object for a C# value; the caller disposes it.</summary>
        public static PyObject ToPython(object value)
        {
            if (value == null || value is PyObject || value is string || value is bool || value is int
                || value is long || value is double || value is short || value is byte || value is uint)
                return value.ToPython();  // native Python values (a PyObject: a new reference to it)
            if (value is float) return ((double)(float)value).ToPython();
            if (value is decimal) return ((double)(decimal)value).ToPython();
            if (value is Guid) return new PyString(((Guid)value).ToString("D"));
            if (value is DateTime) return new PyString(((DateTime)value).ToUniversalTime().ToString("o"));
            if (value is Enum) return new PyString(SnakeCase(value.ToString()));
            var dictionary = value as IDictionary;
            if (dictionary != null)
            {
                var result = new PyDict();
                foreach (DictionaryEntry entry in dictionary)
                    using (var item = ToPython(entry.Value))
                        result.SetItem(Convert.ToString(entry.Key, CultureInfo.InvariantCulture), item);
                return result;
            }
            var sequence = value as IEnumerable;
            if (sequence != null)
            {
                var result = new PyList();
                foreach (var element in sequence)
                    using (var item = ToPython(element))
                        result.Append(item);
                return result;
            }
            var fields = new PyDict();
            foreach (var property in value.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance))
            {
                if (property.GetIndexParameters().Length > 0) continue;
                using (var item = ToPython(property.GetValue(value, null)))
                    fields.SetItem(SnakeCase(property.Name), item);
            }
            return fields;
        }

        static PyObject boolType;

        /// <summary>A plain C# value for a Python one: Reply, List, string, long, double, bool or null.</summary>
        public static object FromPython(PyObject value)
        {
            if (value == null || value.IsNone()) return null;
            if (PyString.IsStringType(value)) return value.As<string>();
            if (PyInt.IsIntType(value))  // bool is an int subclass: tell them apart by type
            {
                if (boolType == null)
                    using (var sample = true.ToPython()) boolType = sample.GetPythonType();
                using (var type = value.GetPythonType())
                    return type.Equals(boolType) ? (object)value.IsTrue() : value.As<long>();
            }
            if (PyFloat.IsFloatType(value)) return value.As<double>();
            if (PyDict.IsDictType(value)) return ToReply(value);
            if (PyList.IsListType(value) || PyTuple.IsTupleType(value))
            {
                var list = new List<object>();
                using (var sequence = new PySequence(value))
                {
                    long count = sequence.Length();
                    for (int i = 0; i < count; i++)
                        using (var item = sequence.GetItem(i))
                            list.Add(FromPython(item));
                }
                return list;
            }
            return value.ToString();  // str(): no Python object reaches the caller, nothing is left to a finalizer
        }

        public static Reply ToReply(PyObject dict)
        {
            if (PythonApi.Available && PyDict.IsDictType(dict)) return ReplyReader.ReadDict(dict.Handle);
            var fields = new Dictionary<string, object>();
            using (var view = new PyDict(dict))
            using (var keys = view.Keys())
            {
                foreach (PyObject key in keys)
                    using (key)
                    using (var item = dict.GetItem(key))
                        fields[key.As<string>()] = FromPython(item);
            }
            return new Reply(fields);
        }

        /// <summary>
        /// A C# member name as its protocol field: SessionId and sessionId become session_id; session_id stays.
        /// Command names are not passed through here: the facade reads them in any spelling.
        /// </summary>
        public static string SnakeCase(string name)
        {
            int upper = 0;
            while (upper < name.Length && !char.IsUpper(name[upper])) upper++;
            if (upper == name.Length) return name;  // snake_case already (a reply's own field names): no copy
            var text = new StringBuilder(name.Length + 8);
            for (int i = 0; i < name.Length; i++)
            {
                char c = name[i];
                if (char.IsUpper(c))
                {
                    if (i > 0 && (char.IsLower(name[i - 1]) || char.IsDigit(name[i - 1])
                                  || (i + 1 < name.Length && char.IsLower(name[i + 1]) && char.IsUpper(name[i - 1]))))
                        text.Append('_');
                    text.Append(char.ToLowerInvariant(c));
                }
                else text.Append(c);
            }
            return text.ToString();
        }
    }
}
